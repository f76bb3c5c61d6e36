#!/usr/bin/env python3
"""Checks the OCI archives images/build.sh made.

For each image: the config (User, Entrypoint, Cmd, Env, ExposedPorts) agrees with
its Dockerfile, and with what the code assumes (the proxy's UID 1337 in `init`'s
iptables exemption and in the injection webhook; the control plane's UID in the
chart's securityContext). Then the layers are unpacked and each entrypoint runs
under chroot as the image's user: `--version`; for the proxy, `init --dry-run`
(as root, like the injected init container) and the iptables it calls resolves
and runs inside the image.

    images/check.py [DIR]     # DIR: where build.sh wrote them (default target/images)

Exits non-zero with every mismatch listed. Needs root (chroot).
"""

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def oci_config_and_layers(archive):
    """The image config JSON and the layer blobs (tar members), in order."""
    with tarfile.open(archive) as tar:
        def blob(digest):
            algo, hexdigest = digest.split(":", 1)
            return tar.extractfile(f"blobs/{algo}/{hexdigest}").read()
        index = json.loads(tar.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        layers = [blob(layer["digest"]) for layer in manifest["layers"]]
    return config["config"], layers


def dockerfile(path):
    """The final stage's USER, ENV, EXPOSE, ENTRYPOINT and CMD of a Dockerfile."""
    text = Path(path).read_text()
    final = text.split("\nFROM ")[-1]
    out = {"user": None, "env": {}, "expose": set(), "entrypoint": None, "cmd": None}
    for line in final.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "USER":
            out["user"] = rest.strip()
        elif word == "ENV":
            key, _, value = rest.strip().partition("=")
            out["env"][key] = value
        elif word == "EXPOSE":
            out["expose"] |= {f"{p}/tcp" if "/" not in p else p for p in rest.split()}
        elif word == "ENTRYPOINT":
            out["entrypoint"] = json.loads(rest)
        elif word == "CMD":
            out["cmd"] = json.loads(rest)
    return out, final


def constant(path, name):
    m = re.search(rf"{name}: \w+ = (\d+);", (ROOT / path).read_text())
    return int(m.group(1))


def unpack(layers, into):
    for layer in layers:
        with tempfile.NamedTemporaryFile() as f:
            f.write(layer)
            f.flush()
            with tarfile.open(f.name) as tar:
                tar.extractall(into, filter="tar") if sys.version_info >= (3, 12) else tar.extractall(into)


def run_in(root, user, argv):
    cmd = ["chroot", f"--userspec={user}", str(root), *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    return p.returncode, p.stdout + p.stderr


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target/images"
    version = re.search(r'^version = "(.*)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    proxy_uid = constant("proxy/src/init.rs", "PROXY_UID")
    check(proxy_uid == constant("control-plane/src/inject/patch.rs", "PROXY_UID"),
          f"init and the injection webhook agree on the proxy UID ({proxy_uid})")
    deployment = (ROOT / "charts/sluice/templates/deployment.yaml").read_text()
    cp_uid = int(re.search(r"runAsUser: (\d+)", deployment).group(1))

    images = [
        ("sluice-proxy", "proxy/Dockerfile", f"{proxy_uid}:{proxy_uid}"),
        # distroless `nonroot` has no USER line: its user is 65532, as the chart says.
        ("sluice-control-plane", "control-plane/Dockerfile", f"{cp_uid}:{cp_uid}"),
    ]
    for name, df_path, want_user in images:
        archive = out / f"{name}.oci.tar"
        print(f"== {archive}")
        config, layers = oci_config_and_layers(archive)
        df, final = dockerfile(ROOT / df_path)
        if df["user"] is not None:
            check(df["user"] == want_user, f"{df_path}: USER {df['user']} is {want_user}")
        else:
            check("distroless" in final and ":nonroot" in final and cp_uid == 65532,
                  f"{df_path}: its nonroot base runs as {cp_uid}, as the chart says")
        check(config.get("User") == want_user, f"{name}: User {config.get('User')} is {want_user}")
        check(config.get("Entrypoint") == df["entrypoint"],
              f"{name}: Entrypoint {config.get('Entrypoint')} is the Dockerfile's {df['entrypoint']}")
        check((config.get("Cmd") or None) == (df["cmd"] or None),
              f"{name}: Cmd {config.get('Cmd')} is the Dockerfile's {df['cmd']}")
        env = dict(e.split("=", 1) for e in config.get("Env", []))
        for k, v in df["env"].items():
            check(env.get(k) == v, f"{name}: Env {k}={env.get(k)} is the Dockerfile's {v}")
        ports = set(config.get("ExposedPorts", {}))
        check(ports == df["expose"], f"{name}: ExposedPorts {sorted(ports)} are the Dockerfile's {sorted(df['expose'])}")

        with tempfile.TemporaryDirectory(prefix=f"{name}-rootfs-") as root:
            # mkdtemp makes it 0700: the image's user must be able to enter its `/`.
            Path(root).chmod(0o755)
            unpack(layers, root)
            entry = config["Entrypoint"]
            code, text = run_in(root, want_user, [*entry, "--version"])
            check(code == 0 and version in text, f"{name}: `{' '.join(entry)} --version` as {want_user}: {text.strip()}")
            if name == "sluice-proxy":
                code, text = run_in(root, "0:0", [*entry, "init", "--dry-run"])
                check(code == 0 and "iptables -w -t nat" in text,
                      f"{name}: `init --dry-run` as root prints its iptables commands")
                code, text = run_in(root, "0:0", ["iptables", "--version"])
                check(code == 0 and "iptables v" in text, f"{name}: the iptables `init` calls runs in the image: {text.strip()}")

    if failures:
        print(f"{len(failures)} failed")
        sys.exit(1)
    print("images: all checks passed")


if __name__ == "__main__":
    main()
