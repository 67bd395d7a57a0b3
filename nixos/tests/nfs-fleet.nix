# NixOS VM test of the vm-tests story "nfs-fleet" (vm-tests/README.md): a
# publisher serves a Nix root read-only over NFS; two runners stack it under
# private uppers with the NixOS module, build at the same time, pick up what
# the publisher adds with `nixfs-layer sync`, and live through a network cut.
# The script: common.py, then nfs-fleet.py.
{ pkgs, self }:
let
  common = import ./common.nix { inherit pkgs self; };
  runner = common.stackedHost {
    server = "publisher";
    lowers = [ "/mnt/pub/nix" ];
  };
in
pkgs.testers.runNixOSTest {
  name = "nixfs-layer-nfs-fleet";
  defaults = common.host;
  nodes = {
    publisher = common.nfsServer;
    runner1 = runner;
    runner2 = runner;
  };
  testScript = builtins.readFile ./common.py + builtins.readFile ./nfs-fleet.py;
}
