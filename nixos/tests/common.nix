# What the NixOS VM tests of the vm-tests stories share (one <story>.nix per
# story next to this file, its test script common.py followed by
# <story>.py; how to run them: vm-tests/README.md). Three kinds of host:
#
# - `host`, every machine: Nix with no substituters and no sandbox (the
#   fixtures' builders run /bin/sh with PATH=/usr/bin:/bin, as on the Debian
#   hosts of the namespace tests, so the coreutils they use are linked into
#   /usr/bin; the fixture flake's builders append their name to
#   /run/nixfs-layer-test/builds, a file outside the store); the fixtures
#   in /etc/nixfs-layer-test/fixtures;
# - `nfsServer`: serves /srv/roots read-only over NFS, for the Nix roots a
#   publisher or a template makes there;
# - `stackedHost`: runs nixfs-layer through its NixOS module, Nix roots on
#   an NFS mount of a server's /srv/roots as its lowers.
{ pkgs, self }:
let
  inherit (pkgs) lib;

  fixtures = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../tests/fixtures
      ../../vm-tests/fixtures
    ];
  };

in
{
  host =
    { pkgs, lib, ... }:
    {
      nix.settings = {
        substituters = lib.mkForce [ ];
        sandbox = false;
        experimental-features = [
          "nix-command"
          "flakes"
        ];
        flake-registry = "";
      };
      networking.firewall.enable = false;
      environment.systemPackages = [ (lib.getBin pkgs.sqlite) ];
      environment.etc."nixfs-layer-test/fixtures".source = fixtures;
      # Builds run as the nixbld users: the build counter is theirs to
      # append to.
      systemd.tmpfiles.rules = [
        "d /run/nixfs-layer-test 0755 root root -"
        "f /run/nixfs-layer-test/builds 0666 root root -"
      ]
      ++ map (b: "L+ /usr/bin/${b} - - - - ${pkgs.coreutils}/bin/${b}") [
        "chmod"
        "date"
        "mkdir"
        "sleep"
      ];
    };

  nfsServer = {
    services.nfs.server = {
      enable = true;
      createMountPoints = true;
      exports = ''
        /srv/roots *(ro,no_root_squash,no_subtree_check)
      '';
    };
  };

  # A machine whose /nix is nixfs-layer's stack: `server`'s /srv/roots
  # mounted on `mountPoint`, `lowers` (Nix roots in it) on top, the
  # machine's own /nix at the bottom, the upper on a disk of its own.
  #
  # The machine's system lives in /nix/store as well, so once the stack
  # covers /nix/store its own paths must come from a lower. It therefore
  # boots from a disk image, where /nix/store is a plain directory of the
  # root file system as on an installed machine (the default test VM's
  # store is the host's, shared into the VM and mounted on /nix/store: a
  # mount point, which `nixfs-layer mount` refuses). The module's
  # ownStoreAsLower puts the machine's own /nix under the stack as the
  # bottom lower.
  #
  # The NFS mount is soft, so that reads of an unreachable server fail with
  # an error (after about 1+2+3 s: timeo=10, retrans=2) instead of hanging,
  # and caches no attributes (actimeo=0), so that `sync` sees at once what
  # the server published, or that it is gone. It is NFSv3 without locks:
  # stateless, every request gives up on its own, where an NFSv4 client may
  # also wait for the recovery of its state on the server. Without
  # autoStart the service (and with it the mount) is started by the test
  # script.
  stackedHost =
    {
      server,
      lowers,
      mountPoint ? "/mnt/pub",
      autoStart ? false,
      flakefs ? false,
    }:
    { lib, pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];

      virtualisation.useBootLoader = true;
      virtualisation.emptyDiskImages = [ 1024 ];
      virtualisation.fileSystems = {
        "/var/lib/nixfs-layer" = {
          device = "/dev/vdb";
          fsType = "ext4";
          autoFormat = true;
        };
        ${mountPoint} = {
          device = "${server}:/srv/roots";
          fsType = "nfs";
          options = [
            "ro"
            "vers=3"
            "nolock"
            "soft"
            "timeo=10"
            "retrans=2"
            "actimeo=0"
          ]
          ++ lib.optional (!autoStart) "noauto";
        };
      };

      services.nixfs-layer = {
        enable = true;
        inherit lowers;
        ownStoreAsLower = true;
        flakefs.enable = flakefs;
      };
      systemd.services.nixfs-layer = {
        wantedBy = lib.mkIf (!autoStart) (lib.mkForce [ ]);
        unitConfig.RequiresMountsFor = [
          "/var/lib/nixfs-layer"
          mountPoint
        ];
      };
    };
}
