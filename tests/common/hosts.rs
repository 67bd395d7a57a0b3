//! Test hosts for the vm-tests scenarios (vm-tests/README.md): each host is
//! a network namespace plus a mount namespace of its own, held open by a
//! `sleep` process, with a tmpfs on its `/nix` and on the fixture flake's
//! build counter. Commands run in a host through `nsenter`. Hosts are
//! joined by veth pairs created inside their namespaces (never in the
//! machine's own), with addresses in 10.231.0.0/24.
//!
//! Everything a host holds — its namespaces, its mounts, the processes
//! started in it — goes when its holder is killed (on drop, or when the
//! test's PID namespace ends, see `ns_test!`), also when a test fails.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::World;

/// The fixture flake's builders append their name here; each host has a
/// tmpfs of its own on it, so builds are counted per host.
pub const BUILDS: &str = "/run/nixfs-layer-test/builds";

/// vm-tests/fixtures/fleet.nix: the scenarios' jobs, on top of
/// tests/fixtures/store.nix.
pub fn fleet_nix() -> String {
    format!("{}/vm-tests/fixtures/fleet.nix", env!("CARGO_MANIFEST_DIR"))
}

pub struct Host {
    pub name: String,
    pid: u32,
    holder: Child,
    /// Per-host HOME (Nix's caches), and this host's disk.
    pub dir: PathBuf,
    env: Vec<(String, String)>,
    /// Processes started in the host, stopped on drop.
    daemons: Vec<Child>,
}

impl Host {
    /// Starts a host: fresh network and mount namespaces (private
    /// propagation), loopback up, a tmpfs on `/nix` and on the build counter.
    pub fn start(w: &World, name: &str) -> Host {
        let mut holder = Command::new("unshare")
            .args(["--net", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", "echo ready; exec sleep infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run unshare (util-linux)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "host {name} did not start");
        let dir = w.path(name);
        std::fs::create_dir_all(dir.join("home")).unwrap();
        let probe = w.nix("true");
        let mut env: Vec<(String, String)> = probe
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
            .collect();
        let home = dir.join("home").display().to_string();
        env.retain(|(k, _)| k != "HOME" && k != "XDG_CACHE_HOME");
        env.push(("HOME".into(), home.clone()));
        env.push(("XDG_CACHE_HOME".into(), format!("{home}/.cache")));
        let h = Host {
            name: name.to_owned(),
            pid: holder.id(),
            holder,
            dir,
            env,
            daemons: Vec::new(),
        };
        std::fs::create_dir_all("/run/nixfs-layer-test").unwrap();
        h.sh(&format!(
            "ip link set lo up && mount -t tmpfs {name}-nix /nix && \
             mount -t tmpfs {name}-builds /run/nixfs-layer-test && : > {BUILDS}"
        ));
        h
    }

    /// Sets an environment variable for every command run in this host
    /// from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// A command that runs in this host's namespaces, with the World's Nix
    /// environment and this host's HOME.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "-n", "--"])
            .arg(program)
            .stdin(Stdio::null())
            .env_remove("NIX_PATH");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs a shell script in the host.
    pub fn run(&self, script: &str) -> Output {
        self.command("sh").args(["-c", script]).output().unwrap()
    }

    /// Runs a shell script in the host and returns its stdout; panics with
    /// its stderr if it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = self.run(script);
        assert!(
            out.status.success(),
            "[{}] `{script}` failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Whether a script succeeds in the host.
    pub fn ok(&self, script: &str) -> bool {
        self.run(script).status.success()
    }

    /// The binary under test, run in the host.
    pub fn tool<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(env!("CARGO_BIN_EXE_nixfs-layer"))
            .args(args)
            .output()
            .unwrap()
    }

    pub fn tool_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.tool(args);
        assert!(
            out.status.success(),
            "[{}] nixfs-layer failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts a long-running process in the host; it is killed on drop.
    pub fn spawn_daemon(&mut self, mut c: Command) {
        self.daemons.push(c.spawn().unwrap());
    }

    /// Builds attributes of a Nix file into a Nix root `root` this host
    /// owns (bound on its /nix for the build); returns the output paths.
    pub fn build_into(&self, root: &Path, file: &str, attrs: &[&str]) -> Vec<String> {
        std::fs::create_dir_all(root).unwrap();
        let attrs: String = attrs.iter().map(|a| format!(" -A '{a}'")).collect();
        self.sh(&format!(
            "mount --bind {root} /nix && trap 'umount /nix' EXIT && nix-build --no-out-link {file}{attrs}",
            root = root.display()
        ))
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// Runs a script with `root` bound on the host's /nix.
    pub fn with_root(&self, root: &Path, script: &str) -> String {
        std::fs::create_dir_all(root).unwrap();
        self.sh(&format!(
            "mount --bind {} /nix && trap 'umount /nix' EXIT && {script}",
            root.display()
        ))
    }

    /// Builds counted on this host (fixture flake builders).
    pub fn builds(&self) -> Vec<String> {
        self.sh(&format!("cat {BUILDS}"))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        // Unmount what the host mounted (sshfs daemons, flake trees and
        // overlays end with the namespace anyway once nothing holds it).
        let _ = self.run("umount -R -l /nix 2>/dev/null; umount -l /nixfs 2>/dev/null; true");
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Makes `host` the switch of a test network: a bridge `br0` with `addr`
/// (e.g. "10.231.0.1") on 10.231.0.0/24.
///
/// The bridge gets a fixed MAC address. Without one it takes the lowest of
/// its ports' addresses, so cabling a host whose port has a lower one
/// changes it: hosts already talking to the switch keep the old address in
/// their ARP cache, the bridge passes their frames up as not its own and
/// the IP layer drops them, until their neighbour entry is probed again
/// (seconds later). Meanwhile ssh's keepalive (3 s here) declares the
/// server dead ("Timeout, server not responding"): sshfs exits without
/// `reconnect` (its mount goes, or reads fail with "Transport endpoint is
/// not connected") and fails requests in flight with EIO with it.
pub fn bridge(host: &Host, addr: &str) {
    host.sh(&format!(
        "ip link add br0 address 02:00:0a:e7:00:01 type bridge && \
         ip addr add {addr}/24 dev br0 && ip link set br0 up"
    ));
}

/// Cables `host` to the bridge of `switch`: a veth pair made in the
/// switch's namespace, port `to-<host name>` on br0 there, `eth0` with
/// `addr`/24 in `host`. `ip link set to-<name> down` in the switch cuts it.
pub fn cable(switch: &Host, host: &Host, addr: &str) {
    let name = &host.name;
    switch.sh(&format!(
        "ip link add to-{name} type veth peer name eth0 netns {} && \
         ip link set to-{name} master br0 && ip link set to-{name} up",
        host.pid
    ));
    host.sh(&format!(
        "ip addr add {addr}/24 dev eth0 && ip link set eth0 up"
    ));
}

/// An sshd in a host serving its file system over SFTP (for sshfs), with
/// a throw-away host key and client key under `dir`.
pub struct Sshd {
    pub addr: String,
    pub client_key: PathBuf,
}

impl Sshd {
    pub fn start(host: &mut Host, addr: &str, dir: &Path) -> Sshd {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        super::sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {d}/host_key && \
             ssh-keygen -q -t ed25519 -N '' -f {d}/client_key && \
             cp {d}/client_key.pub {d}/authorized_keys"
        ));
        let cfg = dir.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "ListenAddress {addr}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                 Subsystem sftp internal-sftp\n"
            ),
        )
        .unwrap();
        // sshd's privilege separation directory (the package's own).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut c = host.command("/usr/sbin/sshd");
        c.args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap());
        host.spawn_daemon(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !host
            .sh(&format!("ss -Hltn 'src {addr}' 'sport = :22'"))
            .contains(addr)
        {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen on {addr}: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd {
            addr: addr.to_owned(),
            client_key: dir.join("client_key"),
        }
    }

    /// Mounts `remote` (a directory of the serving host) read-only on
    /// `mountpoint` in `host` with sshfs. ssh logs to `<host dir>/ssh.log`
    /// ("Timeout, server … not responding" says the link was lost; see
    /// [`bridge`]).
    /// `reconnect`: sshfs reconnects after a lost link, which ssh's
    /// keepalive notices within ~3 s (the NFS-fleet scenario cuts the
    /// network and expects reads to work again; requests meanwhile fail
    /// with EIO). Without it the keepalive is patient (a minute): nothing
    /// cuts the link, and a loaded machine is no reason to drop it.
    pub fn sshfs(&self, host: &Host, remote: &Path, mountpoint: &Path, reconnect: bool) {
        std::fs::create_dir_all(mountpoint).unwrap();
        host.sh(&format!(
            "sshfs -o ro,allow_other,{reconnect}ServerAliveCountMax=2,\
             ConnectTimeout=2,BatchMode=yes,IdentityFile={key},StrictHostKeyChecking=no,\
             UserKnownHostsFile=/dev/null,LogLevel=INFO,cache=no,attr_timeout=0,entry_timeout=0 \
             -o 'ssh_command=ssh -E {log}' root@{addr}:{remote} {mp}",
            log = host.dir.join("ssh.log").display(),
            key = self.client_key.display(),
            reconnect = if reconnect {
                "reconnect,ServerAliveInterval=1,"
            } else {
                "ServerAliveInterval=30,"
            },
            addr = self.addr,
            remote = remote.display(),
            mp = mountpoint.display()
        ));
    }
}

/// Polls `f` until it is true or `secs` pass; returns whether it became true.
pub fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
