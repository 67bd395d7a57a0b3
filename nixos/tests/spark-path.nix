# NixOS VM test of the vm-tests story "spark-path" (vm-tests/README.md):
# three executors resolve the same static path, /nixfs/flake/str/myflake#hello,
# at the same time. The publisher serves two Nix roots over NFS, one with the
# fixture flake's hello built (exec-a's lower), one without (exec-b's and
# exec-c's). exec-a builds nothing; exec-b and exec-c build it once each,
# into their own upper. The script: common.py, then spark-path.py.
{ pkgs, self }:
let
  common = import ./common.nix { inherit pkgs self; };
  executor =
    root:
    common.stackedHost {
      server = "publisher";
      lowers = [ "/mnt/pub/${root}/nix" ];
      flakefs = true;
    };
in
pkgs.testers.runNixOSTest {
  name = "nixfs-layer-spark-path";
  defaults = {
    imports = [ common.host ];
    # `myflake`: the fixture flake, which the test script copies to
    # /srv/flake on every machine.
    nix.registry.myflake.to = {
      type = "path";
      path = "/srv/flake";
    };
  };
  nodes = {
    publisher = common.nfsServer;
    exec-a = executor "with-hello";
    exec-b = executor "without-hello";
    exec-c = executor "without-hello";
  };
  testScript = builtins.readFile ./common.py + builtins.readFile ./spark-path.py;
}
