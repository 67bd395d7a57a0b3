# NixOS module: services.nixfs-layer mounts the layered store before
# nix-daemon starts (and restarts a running nix-daemon after mounting).
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixfs-layer;
  render = import ./render-config.nix;
  settings = lib.recursiveUpdate {
    lowers = map toString cfg.lowers;
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
      before = [ "nix-daemon.service" "nix-daemon.socket" ];
      after = [ "local-fs.target" "remote-fs.target" ];
      path = [ cfg.package config.nix.package pkgs.util-linux ];
      # Ready (sd_notify) once the overlay, merged database and flake tree
      # are up; the service serves the tree itself and unmounts everything
      # on stop (SIGTERM).
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStartPre = "${cfg.package}/bin/nixfs-layer init --config ${configFile}";
        ExecStart = "${cfg.package}/bin/nixfs-layer mount --foreground --config ${configFile}";
        ExecStartPost = "-${pkgs.systemd}/bin/systemctl try-restart nix-daemon.service";
        TimeoutStartSec = "30min";
        KillMode = "mixed";
      };
    };
  };
}
