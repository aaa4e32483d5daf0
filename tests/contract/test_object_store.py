"""The same contract on every ObjectStore: the fake, the folder, and (issue 3) S3."""

from __future__ import annotations

import pytest

from integrations.fakes import InMemoryObjectStore
from integrations.storage import LocalObjectStore, ObjectNotFound, S3ObjectStore


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    if request.param == "memory":
        return InMemoryObjectStore()
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    cfg = request.getfixturevalue("s3_settings")
    return S3ObjectStore(
        endpoint=cfg["endpoint"],
        bucket=cfg["bucket"],
        access_key=cfg["access_key"],
        secret_key=cfg["secret_key"],
        secure=False,
        region=cfg["region"],
    )


def test_put_get_roundtrip(store):
    store.put("images/a/b/f0.png", b"\x89PNG data", content_type="image/png")
    assert store.get("images/a/b/f0.png") == b"\x89PNG data"
    assert store.exists("images/a/b/f0.png")


def test_put_same_key_overwrites(store):
    store.put("k/x.bin", b"one")
    store.put("k/x.bin", b"two")
    assert store.get("k/x.bin") == b"two"
    assert list(store.list("k/")) == ["k/x.bin"]


def test_missing_key(store):
    assert not store.exists("nope/x.png")
    with pytest.raises(ObjectNotFound, match=r"nope/x\.png"):
        store.get("nope/x.png")


def test_list_by_prefix_is_sorted_and_recursive(store):
    for key in ("b/2.png", "a/1.png", "a/deep/3.png", "c.png"):
        store.put(key, b"x")
    assert list(store.list("a/")) == ["a/1.png", "a/deep/3.png"]
    assert list(store.list()) == ["a/1.png", "a/deep/3.png", "b/2.png", "c.png"]


def test_delete_is_idempotent(store):
    store.put("d/x", b"x")
    store.delete("d/x")
    store.delete("d/x")
    assert not store.exists("d/x")


@pytest.mark.parametrize("key", ["../escape.png", "/abs/path.png", "a//b.png", "a/../b.png", "", "dir/", "sp ace.png"])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(ValueError, match="invalid object key"):
        store.put(key, b"x")


def test_large_object_roundtrip(store):
    data = bytes(range(256)) * 40_000  # 10 MB
    store.put("big/object.bin", data)
    assert store.get("big/object.bin") == data


def test_link_opens_the_object(store):
    import urllib.request

    store.put("exports/a/x.png", b"\x89PNG linked")
    link = store.link("exports/a/x.png", expires_s=600)
    if link.startswith(("file:", "http:", "https:")):  # the fake's memory:// links are not fetchable
        with urllib.request.urlopen(link, timeout=30) as r:
            assert r.read() == b"\x89PNG linked"
    if isinstance(store, S3ObjectStore):
        assert "X-Amz-Expires=600" in link
    with pytest.raises(ObjectNotFound):
        store.link("exports/a/missing.png")
