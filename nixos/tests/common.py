# Shared by the test scripts of the NixOS VM tests (nixos/tests/<story>.py):
# prepended to each by its <story>.nix. Paths are those common.nix sets up.

FIXTURES = "/etc/nixfs-layer-test/fixtures"
STORE_NIX = f"{FIXTURES}/tests/fixtures/store.nix"
FLEET_NIX = f"{FIXTURES}/vm-tests/fixtures/fleet.nix"
FLAKE_SRC = f"{FIXTURES}/tests/fixtures/flake"
# Where an NFS server keeps the Nix roots it serves (its NFS export).
ROOTS = "/srv/roots"
UPPER = "/var/lib/nixfs-layer/upper"
PIN_SUFFIX = "-nixfs-layer-lowers"
# The fixture flake's builders append their name here (one file per VM).
BUILDS = "/run/nixfs-layer-test/builds"


def serve_roots(server):
    """Waits until `server` serves ROOTS over NFS."""
    server.wait_for_unit("nfs-server.service")
    server.succeed("systemctl start network-online.target")
    server.wait_for_unit("network-online.target")


def publish(m, root, nix_file, attrs):
    """Builds attributes of a fixture file in m's own store and copies
    their closures, derivations included, into the Nix root root/nix (as
    `nix-build` in that root would leave them); returns the output paths."""
    args = " ".join("-A " + a for a in attrs)
    drvs = " ".join(m.succeed(f"nix-instantiate {nix_file} {args}").split())
    outs = m.succeed(f"nix-store --realise {drvs}").split()
    m.succeed(
        f"nix copy --no-check-sigs --to {root} $(nix-store -qR --include-outputs {drvs})"
    )
    return outs


def base_name(path):
    return path.rsplit("/", 1)[-1]


def with_suffix(paths, suffix):
    """The one path of `paths` that ends with `suffix`."""
    found = [p for p in paths if p.endswith(suffix)]
    assert len(found) == 1, f"one path ending with {suffix} in {paths}"
    return found[0]


def valid(m, path):
    return m.execute(f"nix-store --check-validity {path}")[0] == 0


def upper_entries(m):
    """The upper's store entries, but for the pin and Nix's bookkeeping
    (.links, lock files: what `nixfs-layer verify` does not count as
    paths either)."""
    names = m.succeed(f"ls -A {UPPER}/store").split()
    return [
        n
        for n in names
        if not (n.endswith(PIN_SUFFIX) or n.startswith(".") or n.endswith(".lock"))
    ]


def builds(m):
    """What the fixture flake built on m, in order."""
    return m.succeed(f"cat {BUILDS}").split()


def digest(m, tree):
    """One hash over a tree: names, types, modes, mtimes, link targets and
    file contents."""
    return m.succeed(
        f"cd {tree} && {{ find . -printf '%p %y %m %T@ %l\\n';"
        " find . -type f -print0 | xargs -0r sha256sum; } | LC_ALL=C sort | sha256sum"
    )
