//! The packaging files are well-formed: flake.nix, the NixOS module and the
//! NixOS VM tests (nixos/tests/) parse with the installed Nix, the VM tests'
//! scripts are valid Python and each story is wired into the flake's
//! checks, and the module's TOML rendering (pure Nix, evaluated here) is
//! read by the tool's own config parser as intended. (The VM tests
//! themselves need Nix with nixpkgs and KVM: vm-tests/README.md.)

use std::path::{Path, PathBuf};
use std::process::Command;

use nixfs_layer::config::{Config, FlakeFsConfig};

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

/// The files in nixos/tests/ whose names end with `.{ext}`, sorted.
fn vm_test_files(ext: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

/// The VM tests' stories: nixos/tests/<story>.nix but for common.nix.
fn vm_test_stories() -> Vec<String> {
    let stories: Vec<String> = vm_test_files("nix")
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|s| s != "common")
        .collect();
    assert!(
        stories.len() >= 3,
        "nixos/tests/ holds the three vm-tests stories: {stories:?}"
    );
    stories
}

#[test]
fn flake_and_module_parse() {
    let mut files: Vec<PathBuf> = ["flake.nix", "nixos/module.nix", "nixos/render-config.nix"]
        .iter()
        .map(|f| PathBuf::from(repo(f)))
        .collect();
    files.extend(vm_test_files("nix"));
    for f in files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Each story's test script is what the driver gets, common.py followed by
/// <story>.py: both files and their concatenation must compile as Python.
/// (The driver also type-checks and lints it, which needs the driver
/// itself: only where the tests run.)
#[test]
fn vm_test_scripts_are_valid_python() {
    const CHECK: &str = "import sys
files = sys.argv[1:]
texts = [open(f).read() for f in files]
for f, t in zip(files, texts):
    compile(t, f, 'exec', dont_inherit=True)
compile(''.join(texts), ' + '.join(files), 'exec', dont_inherit=True)
";
    for story in vm_test_stories() {
        let script = repo(&format!("nixos/tests/{story}.py"));
        let out = Command::new("python3")
            .args(["-c", CHECK, &repo("nixos/tests/common.py"), &script])
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every story's .nix reads common.py and its own script, and is one of
/// the flake's checks.
#[test]
fn vm_test_stories_are_wired() {
    let flake = std::fs::read_to_string(repo("flake.nix")).unwrap();
    for story in vm_test_stories() {
        let nix = std::fs::read_to_string(repo(&format!("nixos/tests/{story}.nix"))).unwrap();
        let reads = format!("builtins.readFile ./common.py + builtins.readFile ./{story}.py");
        assert!(
            nix.contains(&reads),
            "nixos/tests/{story}.nix: testScript = {reads}"
        );
        assert!(
            flake.contains(&format!("\"{story}\"")),
            "flake.nix: \"{story}\" among the checks"
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
    // Every [flakefs] key given, and no other.
    assert_eq!(
        c.flakefs,
        FlakeFsConfig {
            enable: Some(true),
            mountpoint: Some("/nixfs".into()),
            allow: vec!["nixpkgs#*".into()],
            deny: vec!["git+ssh:*".into()],
            build_users: vec!["spark".into()],
            max_parallel_builds: Some(3),
            ttl: Some(600),
            ..FlakeFsConfig::default()
        },
        "{text}"
    );
}
