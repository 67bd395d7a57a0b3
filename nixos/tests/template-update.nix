# NixOS VM test of the vm-tests story "template-update" (vm-tests/README.md):
# a template's Nix root, served read-only over NFS, is the lower of an AppVM
# whose upper is on a disk of its own and whose nixfs-layer service mounts
# the stack at every boot. Between the AppVM's boots the template gains and
# loses paths; the AppVM's own builds keep working or are reported broken by
# name. The script: common.py, then template-update.py.
{ pkgs, self }:
let
  common = import ./common.nix { inherit pkgs self; };
in
pkgs.testers.runNixOSTest {
  name = "nixfs-layer-template-update";
  defaults = common.host;
  nodes = {
    template = common.nfsServer;
    appvm = common.stackedHost {
      server = "template";
      mountPoint = "/mnt/template";
      lowers = [ "/mnt/template/nix" ];
      autoStart = true;
    };
  };
  testScript = builtins.readFile ./common.py + builtins.readFile ./template-update.py;
}
