//! Evidence stays private and actions stay aimed: `loopbpf record` keeps its bundle to its own
//! user and follows no symlink planted in it, `--on-block signal:` takes no signal that would
//! kill or freeze the target, and `sudo loopbpf -- COMMAND` runs the command as the user who
//! ran sudo (or `--user`), not as root.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use loopbpf_tests::{Fixture, Loopbpf, node_bin, require_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_mins(1);
const NOBODY: u32 = 65534;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loopbpf-aim-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_file(&dir);
    dir
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Records one block of a real node process into `dir`, ended by Ctrl-C.
fn record_one_block(dir: &Path) {
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let loopbpf = Loopbpf::attach(&["record", "--pid", &pid, "--out", dir.to_str().unwrap()]);
    node.send("block timer spin 200");
    node.done("block", TIMEOUT);
    let report = dir.join("report.json");
    loopbpf_tests::wait_until("the block in report.json", TIMEOUT, || {
        fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|r| r["blocks"].as_array().is_some_and(|b| b.len() == 1))
    });
    loopbpf.stop(TIMEOUT);
}

/// Runs loopbpf to its end with `env` set; returns whether it succeeded, stdout and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(loopbpf_tests::loopbpf_bin());
    command
        .args(args)
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("loopbpf runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_bundle_is_private() {
    require_root();
    let dir = scratch("private");
    record_one_block(&dir);
    assert_eq!(mode(&dir), 0o700, "the bundle directory");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        names.push(entry.file_name().into_string().unwrap());
        assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
    }
    names.sort();
    // No temporary file is left behind.
    assert_eq!(
        names,
        [
            "flamegraph.svg",
            "index.html",
            "report.json",
            "report.txt",
            "timeline.svg"
        ]
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_symlink_planted_in_the_bundle_is_not_followed() {
    require_root();
    let dir = scratch("planted");
    let canary = scratch("canary");
    fs::write(&canary, "canary\n").unwrap();
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    for name in ["report.json", "flamegraph.svg", "report.json.tmp"] {
        std::os::unix::fs::symlink(&canary, dir.join(name)).unwrap();
    }
    record_one_block(&dir);
    assert_eq!(fs::read_to_string(&canary).unwrap(), "canary\n");
    for name in ["report.json", "flamegraph.svg"] {
        let meta = fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(meta.is_file(), "{name} is still a symlink");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let report: Value =
        serde_json::from_slice(&fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["blocks"].as_array().unwrap().len(), 1);
    fs::remove_dir_all(dir).unwrap();
    fs::remove_file(canary).unwrap();
}

#[test]
fn an_out_of_another_user_or_open_to_others_is_refused() {
    require_root();
    let node = Fixture::start();
    let pid = node.pid().to_string();
    let dir = scratch("foreign");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = dir.to_str().unwrap();
    let (ok, _, err) = run(&["record", "--pid", &pid, "--out", out], &[]);
    assert!(!ok, "recorded into a directory of uid {NOBODY}");
    assert!(
        err.contains("belongs to uid 65534") && err.contains("does not exist yet"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "wrote into it anyway"
    );
    fs::remove_dir(&dir).unwrap();

    let shared = scratch("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, _, err) = run(
        &["record", "--pid", &pid, "--out", shared.to_str().unwrap()],
        &[],
    );
    assert!(!ok && err.contains("writable by other users"), "{err}");
    assert_eq!(
        mode(&shared),
        0o777,
        "an existing directory's mode is the user's"
    );
    fs::remove_dir(&shared).unwrap();
}

#[test]
fn signals_that_kill_or_stop_the_target_are_refused() {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let out = scratch("fatal");
    for signal in ["signal:KILL", "signal:SIGSTOP", "signal:9", "signal:19"] {
        let (ok, _, err) = run(
            &[
                "record",
                "--pid",
                &pid,
                "--out",
                out.to_str().unwrap(),
                "--on-block",
                signal,
            ],
            &[],
        );
        assert!(!ok, "{signal} accepted");
        assert!(
            err.contains("would kill or stop the target"),
            "{signal}: {err}"
        );
        assert!(err.contains("SIGUSR2"), "{signal}: {err}");
    }
    assert!(node.is_running());
    assert!(!out.exists(), "a refused recording left a bundle directory");
}

/// What the launched command says of its own ids.
const WHO: &str = "console.log(JSON.stringify({uid: process.getuid(), gid: process.getgid(), groups: process.getgroups()})); setTimeout(() => {}, 300)";

fn launched_as(extra: &[&str], env: &[(&str, &str)]) -> (Value, String) {
    let node = node_bin();
    let args = [extra, &["--duration", "20s", "--", &node, "-e", WHO]].concat();
    let (ok, out, err) = run(&args, env);
    assert!(ok, "loopbpf -- node failed: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("{\"uid\""))
        .unwrap_or_else(|| panic!("the command printed no ids: {out}\n{err}"));
    (serde_json::from_str(line).unwrap(), err)
}

#[test]
fn a_command_launched_under_sudo_runs_as_the_invoking_user() {
    require_root();
    let nobody = NOBODY.to_string();
    let sudo = [("SUDO_UID", nobody.as_str()), ("SUDO_GID", nobody.as_str())];
    let (ids, err) = launched_as(&[], &sudo);
    assert_eq!(ids["uid"], NOBODY, "{ids}");
    assert_eq!(ids["gid"], NOBODY, "{ids}");
    assert_eq!(ids["groups"], serde_json::json!([NOBODY]), "{ids}");
    assert!(!err.contains("as root"), "{err}");

    // --user chooses, by name or by uid, over SUDO_UID.
    let (ids, _) = launched_as(&["--user", "daemon"], &sudo);
    assert_eq!(
        (ids["uid"].as_u64(), ids["gid"].as_u64()),
        (Some(1), Some(1)),
        "{ids}"
    );
    let (ids, _) = launched_as(&["--user", "2"], &sudo);
    assert_eq!(ids["uid"], 2, "{ids}");

    // Without SUDO_UID a root loopbpf runs it as root, and says so.
    let (ids, err) = launched_as(&[], &[]);
    assert_eq!(ids["uid"], 0, "{ids}");
    assert!(err.contains("as root"), "{err}");

    let (ok, _, err) = run(
        &["--user", "no-such-user-loopbpf", "--", "node", "-e", "0"],
        &[],
    );
    assert!(!ok && err.contains("no such user"), "{err}");
}
