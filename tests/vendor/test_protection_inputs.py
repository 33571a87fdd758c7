"""The protection secret and the teacher's calibration are derived only when a key's mode needs
them: a vendor whose keys are all `none` (overlap detection on, the default) serves embeddings,
classifications, its model card and usage without ever embedding the calibration set or
generating the secret file, and still records its keys' exact inputs for `vendor-admin suspects`.
"""

from __future__ import annotations

import redis

from tests.support.imaging import image_item, random_image
from vendor_api import service as service_module
from vendor_api.protection.overlap import PREFIX
from vendor_api.protection.secret import SECRET_FILE


def _count_calibrations(monkeypatch) -> list[object]:
    """Every call of the real calibration function the service uses, recorded."""
    calls: list[object] = []
    real = service_module.compute_calibration

    def counted(teacher, calibration_dir=None):  # type: ignore[no-untyped-def]
        calls.append(calibration_dir)
        return real(teacher, calibration_dir)

    monkeypatch.setattr(service_module, "compute_calibration", counted)
    return calls


def _overlap_keys(url: str, kind: str) -> list[bytes]:
    store = redis.Redis.from_url(url)
    try:
        return store.keys(f"{PREFIX}:{kind}:*")
    finally:
        store.close()


def test_a_vendor_whose_keys_are_all_none_never_derives_the_secret_or_the_calibration(make_vendor, monkeypatch):
    calibrations = _count_calibrations(monkeypatch)
    vendor = make_vendor()
    assert vendor.settings.overlap_detection and vendor.settings.protection_secret is None
    secret_file = vendor.settings.data_dir / SECRET_FILE
    key = vendor.create_key(protection="none")
    images = [image_item(random_image(seed)) for seed in range(3)]
    with vendor.client(key) as client:
        embedded = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [*images, "a dog"]})
        classified = client.post("/v1/classifications",
                                 json={"model": vendor.model_id, "input": images, "classes": ["dog", "cat"]})
        card, usage = client.get("/v1/models"), client.get("/v1/usage")
    assert [r.status_code for r in (embedded, classified, card, usage)] == [200, 200, 200, 200], embedded.text
    assert calibrations == [] and not secret_file.exists()
    assert _overlap_keys(vendor.redis_url, "seen")  # exact inputs are still recorded
    assert not _overlap_keys(vendor.redis_url, "band")  # near-duplicate codes would have needed both

    keyed = vendor.create_key(name="keyed", protection="rotate")
    with vendor.client(keyed) as client:
        for _ in range(2):
            assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": images}).status_code == 200
    assert len(calibrations) == 1 and secret_file.exists()  # the first keyed request derived both, once
    assert _overlap_keys(vendor.redis_url, "band")
