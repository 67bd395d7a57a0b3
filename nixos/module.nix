# NixOS module: services.nixfs-layer mounts the layered store before
# nix-daemon starts (and restarts a running nix-daemon after mounting).
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixfs-layer;
  render = import ./render-config.nix;
  # This machine's own /nix as it was before the stack covered it.
  ownNix = "/run/nixfs-layer-own-nix";
  lowers = cfg.lowers ++ lib.optional cfg.ownStoreAsLower ownNix;
  settings = lib.recursiveUpdate {
    lowers = map toString lowers;
    upper = toString cfg.upper;
    target = toString cfg.target;
    flakefs = {
      enable = cfg.flakefs.enable;
      mountpoint = toString cfg.flakefs.mountpoint;
      allow = cfg.flakefs.allow;
      deny = cfg.flakefs.deny;
      build-users = cfg.flakefs.buildUsers;
    };
  } cfg.settings;
  configFile = pkgs.writeText "nixfs-layer.toml" (render settings);
in
{
  options.services.nixfs-layer = with lib; {
    enable = mkEnableOption "nixfs-layer, read-only lower Nix stores under a writable upper";
    package = mkOption {
      type = types.package;
      description = "The nixfs-layer package.";
    };
    lowers = mkOption {
      type = types.listOf types.path;
      example = [ "/run/template-nix" ];
      description = "Lower Nix roots (each holding store/ and var/nix/db/), first on top.";
    };
    ownStoreAsLower = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Put this machine's own /nix under the stack as its bottom lower:
        before mounting, /nix is bound read-only and private on
        ${ownNix} (private, so that the stack's own mounts on /nix/store
        and /nix/var do not show through). Needed where the system itself
        lives in /nix/store, as on NixOS: once the stack covers /nix/store
        the system's paths must come from a lower. /nix/store must be a
        directory of the root file system (an installed machine), not a
        mount point of its own.
      '';
    };
    upper = mkOption {
      type = types.path;
      default = "/var/lib/nixfs-layer/upper";
      description = "The writable upper layer (created with `nixfs-layer init` if missing).";
    };
    target = mkOption {
      type = types.path;
      default = "/nix";
      description = "Where the merged store appears (TARGET/store, TARGET/var).";
    };
    flakefs = {
      enable = mkOption { type = types.bool; default = true; description = "Serve the /nixfs/flake tree."; };
      mountpoint = mkOption { type = types.path; default = "/nixfs"; description = "Where the flake tree is mounted."; };
      allow = mkOption { type = types.listOf types.str; default = [ ]; description = "Glob patterns of flake references that may be resolved (empty: all)."; };
      deny = mkOption { type = types.listOf types.str; default = [ "git+ssh:*" ]; description = "Glob patterns of flake references that are refused."; };
      buildUsers = mkOption { type = types.listOf types.str; default = [ ]; description = "Users (names or uids) who may trigger builds besides root."; };
    };
    settings = mkOption {
      type = types.attrs;
      default = { };
      example = { flakefs = { max-parallel-builds = 4; ttl = 600; }; };
      description = "Further configuration keys (docs/configuration.md), merged over the options above.";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.etc."nixfs-layer/config.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];
    systemd.services.nixfs-layer = {
      description = "nixfs-layer: layered Nix store";
      wantedBy = [ "multi-user.target" ];
      # nix-daemon runs in a mount namespace of its own, copied when it
      # starts, and listens in TARGET/var: it starts after the stack is
      # mounted, and stops before it is unmounted (`umount` refuses while
      # it listens there).
      before = [ "nix-daemon.service" "nix-daemon.socket" ];
      after = [ "local-fs.target" "remote-fs.target" ] ++ lib.optional cfg.ownStoreAsLower "nixfs-layer-own-nix.service";
      requires = lib.optional cfg.ownStoreAsLower "nixfs-layer-own-nix.service";
      path = [ cfg.package config.nix.package pkgs.util-linux ];
      # Ready (sd_notify) once the overlay, merged database and flake tree
      # are up; the service serves the tree itself and unmounts everything
      # on stop (SIGTERM).
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStartPre = "${cfg.package}/bin/nixfs-layer init --config ${configFile}";
        ExecStart = "${cfg.package}/bin/nixfs-layer mount --foreground --config ${configFile}";
        ExecStartPost = "-${pkgs.systemd}/bin/systemctl try-restart nix-daemon.socket nix-daemon.service";
        TimeoutStartSec = "30min";
        KillMode = "mixed";
      };
    };
    # Stopping (or restarting) the stack stops (restarts) the daemon first.
    systemd.services.nix-daemon.partOf = [ "nixfs-layer.service" ];
    systemd.sockets.nix-daemon.partOf = [ "nixfs-layer.service" ];
    systemd.services.nixfs-layer-own-nix = lib.mkIf cfg.ownStoreAsLower {
      description = "This machine's own /nix, read-only, as the bottom lower of nixfs-layer";
      path = [ pkgs.util-linux ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        mkdir -p ${ownNix}
        if ! mountpoint -q ${ownNix}; then
          mount --bind /nix ${ownNix}
          mount --make-private ${ownNix}
          mount -o remount,bind,ro ${ownNix}
        fi
      '';
    };
  };
}
