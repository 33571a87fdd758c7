"""The client side: buys teacher embeddings from a vendor API and distils them into a small student."""
