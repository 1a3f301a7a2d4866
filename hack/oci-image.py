#!/usr/bin/env python3
"""Write a single-layer OCI image archive (an OCI image layout in a tar) from local files.

No base image, no daemon, no registry: the layer holds exactly the files named here, so an image
is reproducible from its inputs (fixed mtimes and owners, sorted entries). The archive loads with
`ctr images import` (containerd) and is a valid OCI layout for skopeo/podman too.

  hack/oci-image.py --ref docker.io/library/NAME:TAG --config CONFIG.json --out OUT.tar \
      [--file SRC:DST[:MODE]]... [--dir DST[:MODE[:UID]]]... [--symlink TARGET:DST]... \
      [--with-libs SRC:DST]...

CONFIG.json holds the image config that the Dockerfile must agree with:
  {"user": "65532:65532", "entrypoint": [...], "cmd": [...], "exposedPorts": ["8080/tcp"], "env": [...]}
--with-libs copies a program and, when it is dynamically linked, the shared libraries `ldd` lists.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

MTIME = 0  # reproducible layers: every entry carries the same time


def add_parents(entries, path):
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        entries.setdefault(d, ("dir", None, 0o755, 0))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="full image name, e.g. docker.io/library/portcullis:0.1.0")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--file", action="append", default=[], help="SRC:DST[:MODE(octal)]")
    p.add_argument("--dir", action="append", default=[], help="DST[:MODE(octal)[:UID]]")
    p.add_argument("--symlink", action="append", default=[], help="TARGET:DST")
    p.add_argument("--with-libs", action="append", default=[], help="SRC:DST (program plus its ldd libraries)")
    return p.parse_args()


def ldd_libs(program):
    run = subprocess.run(["ldd", program], capture_output=True, text=True)
    if run.returncode != 0:  # a static program: nothing to add
        return []
    out = run.stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" ")[0]
        else:
            target = line.split(" ")[0]
        if target.startswith("/"):
            libs.append(target)
    return libs


def collect(args):
    # path (no leading slash) -> (kind, source or link target, mode, uid)
    entries = {}
    for spec in args.file:
        parts = spec.split(":")
        src, dst = parts[0], parts[1]
        mode = int(parts[2], 8) if len(parts) > 2 else 0o644
        add_parents(entries, dst)
        entries[dst.strip("/")] = ("file", src, mode, 0)
    for spec in args.with_libs:
        src, dst = spec.split(":")
        add_parents(entries, dst)
        entries[dst.strip("/")] = ("file", src, 0o755, 0)
        for lib in ldd_libs(src):
            real = os.path.realpath(lib)
            add_parents(entries, lib)
            entries[lib.strip("/")] = ("file", real, 0o755, 0)
    for spec in args.dir:
        parts = spec.split(":")
        mode = int(parts[1], 8) if len(parts) > 1 else 0o755
        uid = int(parts[2]) if len(parts) > 2 else 0
        add_parents(entries, parts[0] + "/x")
        entries[parts[0].strip("/")] = ("dir", None, mode, uid)
    for spec in args.symlink:
        target, dst = spec.split(":")
        add_parents(entries, dst)
        entries[dst.strip("/")] = ("symlink", target, 0o777, 0)
    return entries


def layer_tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, src, mode, uid = entries[path]
            info = tarfile.TarInfo(path)
            info.mtime, info.mode, info.uid, info.gid = MTIME, mode, uid, uid
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, src
                tar.addfile(info)
            else:
                with open(src, "rb") as f:
                    data = f.read()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def blob(blobs, media_type, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def main():
    args = parse_args()
    with open(args.config) as f:
        wanted = json.load(f)
    raw = layer_tar(collect(args))
    # mtime=0 keeps the compressed layer reproducible too.
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    blobs = {}
    layer = blob(blobs, "application/vnd.oci.image.layer.v1.tar+gzip", gz)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": wanted["user"],
            "Entrypoint": wanted["entrypoint"],
            "Cmd": wanted.get("cmd", []),
            "ExposedPorts": {p: {} for p in wanted.get("exposedPorts", [])},
            "Env": wanted.get("env", ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]),
            "WorkingDir": wanted.get("workingDir", "/"),
            "Labels": wanted.get("labels", {}),
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created_by": "hack/oci-image.py", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    }
    config_desc = blob(blobs, "application/vnd.oci.image.config.v1+json", json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer],
    }
    manifest_desc = blob(blobs, "application/vnd.oci.image.manifest.v1+json", json.dumps(manifest, sort_keys=True).encode())
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    tag = args.ref.rsplit(":", 1)[1] if ":" in args.ref.rsplit("/", 1)[-1] else "latest"
    # containerd names the image from io.containerd.image.name; OCI tools read the tag from ref.name.
    manifest_desc["annotations"] = {"io.containerd.image.name": args.ref, "org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".partial"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        def put(name, data):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            out.addfile(info, io.BytesIO(data))

        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", json.dumps(index, sort_keys=True).encode())
        for digest, data in sorted(blobs.items()):
            put("blobs/sha256/" + digest.split(":", 1)[1], data)
    os.replace(tmp, args.out)
    print(f"{args.ref} -> {args.out} (layer {len(gz) // 1024} KiB, config {config_desc['digest'][:19]})", file=sys.stderr)


if __name__ == "__main__":
    main()
