# Renders nixfs-layer's TOML configuration from a Nix attribute set, with
# builtins only (so it can be evaluated and tested without nixpkgs).
#   { lowers, upper, target, flakefs = { enable, mountpoint, allow, deny, build-users, … }; }
let
  inherit (builtins) isBool isInt isString isList isAttrs toJSON concatStringsSep
    attrNames filter map typeOf;
  value = v:
    if isBool v then (if v then "true" else "false")
    else if isInt v then toString v
    else if isString v then toJSON v
    else if isList v then "[" + concatStringsSep ", " (map value v) + "]"
    else throw "nixfs-layer config: cannot render a ${typeOf v}";
  scalars = set: filter (k: set.${k} != null && !(isAttrs set.${k})) (attrNames set);
  tables = set: filter (k: isAttrs set.${k}) (attrNames set);
  lines = set: map (k: "${k} = ${value set.${k}}") (scalars set);
in
settings:
  concatStringsSep "\n" (
    lines settings
    ++ builtins.concatMap (t: [ "" "[${t}]" ] ++ lines settings.${t}) (tables settings)
  ) + "\n"
