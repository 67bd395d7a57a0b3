//! The packaging files are well-formed: flake.nix and the NixOS module
//! parse with the installed Nix, and the module's TOML rendering (pure Nix,
//! evaluated here) is read by the tool's own config parser as intended.

use std::path::Path;
use std::process::Command;

use nixfs_layer::config::Config;

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

#[test]
fn flake_and_module_parse() {
    for f in ["flake.nix", "nixos/module.nix", "nixos/render-config.nix"] {
        let out = Command::new("nix-instantiate")
            .args(["--parse", &repo(f)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_modules_rendered_config_is_what_the_tool_reads() {
    let expr = format!(
        r#"import {} {{
             lowers = [ "/run/template-nix" "/srv/second" ];
             upper = "/var/lib/nixfs-layer/upper";
             target = "/nix";
             flakefs = {{ enable = true; mountpoint = "/nixfs"; allow = [ "nixpkgs#*" ]; deny = [ "git+ssh:*" ];
                          build-users = [ "spark" ]; max-parallel-builds = 3; ttl = 600; }};
           }}"#,
        repo("nixos/render-config.nix")
    );
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text: String = serde_json::from_slice(&out.stdout).unwrap();
    let c =
        Config::parse(&text, Path::new("rendered.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        c.lowers,
        vec![Path::new("/run/template-nix"), Path::new("/srv/second")]
    );
    assert_eq!(
        c.upper.as_deref(),
        Some(Path::new("/var/lib/nixfs-layer/upper"))
    );
    assert_eq!(c.target.as_deref(), Some(Path::new("/nix")));
    assert_eq!(c.flakefs.enable, Some(true));
    assert_eq!(c.flakefs.mountpoint.as_deref(), Some(Path::new("/nixfs")));
}
