"""The vendor: serves one open_clip teacher behind a metered, pay-per-query embedding API."""
