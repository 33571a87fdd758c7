"""The /admin HTTP routes: disabled without a secret, guarded by it, and one store with the CLI."""

from __future__ import annotations


def test_admin_routes_are_disabled_without_a_secret(vendor):
    with vendor.client("anything") as client:
        r = client.get("/admin/keys")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_admin_routes_need_the_secret_and_manage_keys(make_vendor):
    vendor = make_vendor(admin_secret="s3cret-admin")
    with vendor.client("wrong") as client:
        assert client.get("/admin/keys").status_code == 401
    with vendor.client() as client:
        assert client.get("/admin/keys").status_code == 401
    with vendor.client("s3cret-admin") as admin:
        created = admin.post("/admin/keys", json={"name": "acme", "quota": 5, "rate_per_s": 2, "burst": 3})
        assert created.status_code == 201
        api_key = created.json()["api_key"]
        assert created.json()["rate_limit"] == {"requests_per_s": 2.0, "burst": 3}
        assert admin.post("/admin/keys", json={"name": "acme", "quota": 5}).status_code == 409
        assert admin.post("/admin/keys", json={"name": "x", "quota": -1}).status_code == 400
        assert admin.post("/admin/keys", json={"name": "y", "quota": 1, "protection": "lasers"}).status_code == 400
        with vendor.client(api_key) as user:
            assert user.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["a", "b"]}).status_code == 200
            assert user.get("/admin/keys").status_code == 401  # a client key is not the admin secret
        listing = admin.get("/admin/keys").json()
        assert [(k["name"], k["spent"]) for k in listing] == [("acme", 2)]
        assert all("api_key" not in k for k in listing)
        assert admin.post("/admin/keys/acme/top-up", json={"units": 10}).json()["quota"] == 15
        assert admin.post("/admin/keys/acme/top-up", json={"units": 0}).status_code == 400
        assert admin.get("/admin/keys/nobody").status_code == 404
        assert admin.delete("/admin/keys/acme").json()["active"] is False
    with vendor.client(api_key) as user:
        assert user.post("/v1/embeddings", json={"model": vendor.model_id, "input": "a"}).status_code == 401
