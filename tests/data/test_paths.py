"""One containment rule for every image path a record names (csmn.data.paths)."""

from __future__ import annotations

import os

import pytest

from csmn.data.paths import PathRejected, resolve_image_path


def test_relative_paths_resolve_under_the_archive(tmp_path):
    root = str(tmp_path)
    assert resolve_image_path(root, "images/a.jpg") == str(tmp_path / "images" / "a.jpg")
    assert resolve_image_path(root, "images/../images/a.jpg") == str(tmp_path / "images/a.jpg")
    assert resolve_image_path(root, str(tmp_path / "x.jpg")) == str(tmp_path / "x.jpg")
    assert resolve_image_path(root, f"file://{tmp_path}/x.jpg") == str(tmp_path / "x.jpg")
    # A file URI is percent-encoded, as Path.as_uri() writes it.
    spaced = tmp_path / "my photos ü" / "x.jpg"
    assert resolve_image_path(root, spaced.as_uri()) == str(spaced)
    assert resolve_image_path(root, f"file://{tmp_path}/a%2F..%2Fx.jpg") == str(
        tmp_path / "x.jpg")
    assert resolve_image_path("s3://b/arch", "images/a.jpg") == "s3://b/arch/images/a.jpg"
    assert resolve_image_path("s3://b/arch", "s3://b/arch/x/../y.jpg") == "s3://b/arch/y.jpg"


@pytest.mark.parametrize("raw", [
    "../../etc/passwd", "images/../../x.jpg", "/etc/shadow", "file:///etc/passwd",
    "file://otherhost/x.jpg", "s3://other-bucket/x.jpg", "http://169.254.169.254/latest",
    "gs://b/x.jpg", "", "   ", "a\x00b.jpg", "file:///tmp/%2E%2E/etc/passwd", "file:///x%00.jpg",
])
def test_paths_leaving_the_archive_are_bad_path(tmp_path, raw):
    with pytest.raises(PathRejected) as caught:
        resolve_image_path(str(tmp_path), raw)
    assert caught.value.code == "bad_path" and caught.value.reason.startswith("bad_path: ")


def test_s3_archives_keep_their_bucket_and_prefix():
    for raw in ("../other/x.jpg", "s3://b/archive-2/x.jpg", "s3://b2/arch/x.jpg", "/etc/passwd",
                "s3://b/arch/../x.jpg"):
        with pytest.raises(PathRejected):
            resolve_image_path("s3://b/arch", raw)


def test_operator_prefixes_allow_more(tmp_path):
    shared = tmp_path / "shared"
    archive = tmp_path / "archive"
    allowed = (str(shared), "s3://photos/users")
    assert resolve_image_path(str(archive), str(shared / "a.jpg"), allowed) == \
        str(shared / "a.jpg")
    assert resolve_image_path(str(archive), "../shared/a.jpg", allowed) == str(shared / "a.jpg")
    assert resolve_image_path(str(archive), "s3://photos/users/u/1.jpg", allowed) == \
        "s3://photos/users/u/1.jpg"
    for raw in (str(tmp_path / "sharedX" / "a.jpg"), "s3://photos/usersX/1.jpg",
                "s3://photos/other.jpg"):
        with pytest.raises(PathRejected):
            resolve_image_path(str(archive), raw, allowed)


def test_a_symlink_inside_the_archive_cannot_point_out(tmp_path):
    (tmp_path / "images").mkdir()
    os.symlink("/etc/passwd", tmp_path / "images" / "out.jpg")
    os.symlink("/etc/no-such-target", tmp_path / "images" / "dangling.jpg")
    (tmp_path / "images" / "real.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "images" / "real.jpg", tmp_path / "images" / "in.jpg")
    assert resolve_image_path(str(tmp_path), "images/in.jpg") == str(tmp_path / "images/in.jpg")
    reasons = []
    for name in ("out.jpg", "dangling.jpg"):
        with pytest.raises(PathRejected) as caught:
            resolve_image_path(str(tmp_path), f"images/{name}")
        reasons.append(caught.value.detail.replace(name, "X"))
    # An existing and a missing target read the same: the reject tells nothing about either.
    assert reasons[0] == reasons[1]


def test_real_path_with_cached_folders_is_realpath(tmp_path):
    from csmn.data.paths import _real_folder, _real_path

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "dir", tmp_path / "dirlink")
    os.symlink("file.jpg", tmp_path / "dir" / "rel.jpg")
    os.symlink("../dir/file.jpg", tmp_path / "dir" / "up.jpg")
    os.symlink("/etc/no-such-target", tmp_path / "dir" / "dangling.jpg")
    os.symlink(tmp_path / "dir" / "dangling.jpg", tmp_path / "dir" / "chain.jpg")
    os.symlink(tmp_path / "loop1", tmp_path / "loop2")
    os.symlink(tmp_path / "loop2", tmp_path / "loop1")
    os.symlink(tmp_path / "nowhere", tmp_path / "gone")
    names = ["file.jpg", "rel.jpg", "up.jpg", "dangling.jpg", "chain.jpg", "missing.jpg"]
    folders = ["dir", "dirlink", "loop1", "gone", "nofolder", "dirlink/../dir"]
    paths = [os.path.normpath(str(tmp_path / f / n)) for f in folders for n in names]
    paths += ["/", "/etc", str(tmp_path / "loop1"), str(tmp_path / "dirlink")]
    _real_folder.cache_clear()
    for _ in range(2):  # cold and cached
        for path in paths:
            assert _real_path(path) == os.path.realpath(path), path
