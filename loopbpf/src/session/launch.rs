//! Launching `loopbpf -- COMMAND`: the child stops itself before `exec`, so the probes are in
//! place (they follow the pid across `exec`) before its first loop iteration. Under sudo the
//! command runs as the user who ran sudo, not as root (`--user` chooses another).

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt,
};

use anyhow::{Context, Result, bail};

/// Whom the launched command runs as, resolved before the fork (the child may only make
/// async-signal-safe calls, and the user database is not one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

impl RunAs {
    /// `--user USER` (a name or a uid), else the user who ran sudo (`SUDO_UID`, `SUDO_GID`);
    /// `None`: the command runs as loopbpf does.
    pub fn choose(user: Option<&str>) -> Result<Option<Self>> {
        if let Some(user) = user {
            return Self::named(user).map(Some);
        }
        let sudo_id = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
        let Some(uid) = sudo_id("SUDO_UID") else {
            return Ok(None);
        };
        let entry = Passwd::by_uid(uid);
        let gid = sudo_id("SUDO_GID")
            .or(entry.as_ref().map(|e| e.gid))
            .unwrap_or(uid);
        let groups = entry.map_or_else(|| vec![gid], |e| e.groups(gid));
        Ok(Some(Self { uid, gid, groups }))
    }

    fn named(user: &str) -> Result<Self> {
        let entry = match user.parse::<u32>() {
            Ok(uid) => Passwd::by_uid(uid).unwrap_or(Passwd {
                name: None,
                uid,
                gid: uid,
            }),
            Err(_) => Passwd::by_name(user).with_context(|| {
                format!("--user {user}: no such user (give a user name or a uid)")
            })?,
        };
        Ok(Self {
            uid: entry.uid,
            gid: entry.gid,
            groups: entry.groups(entry.gid),
        })
    }
}

/// What the user database says of a user.
struct Passwd {
    name: Option<CString>,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

impl Passwd {
    fn by_uid(uid: libc::uid_t) -> Option<Self> {
        Self::lookup(|pwd, buf, result| {
            // SAFETY: every pointer is valid for the call; buf's length is passed along.
            unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result) }
        })
    }

    fn by_name(name: &str) -> Option<Self> {
        let name = CString::new(name).ok()?;
        Self::lookup(|pwd, buf, result| {
            // SAFETY: name is NUL-terminated; the other pointers are valid for the call.
            unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result) }
        })
    }

    fn lookup(
        call: impl Fn(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> i32,
    ) -> Option<Self> {
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        // SAFETY: passwd is plain old data; the lookup fills it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        if call(&raw mut pwd, &mut buf, &raw mut result) != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside buf.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }.to_owned();
        Some(Self {
            name: Some(name),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }

    /// The user's groups (those the group database gives them, and `gid`).
    fn groups(&self, gid: libc::gid_t) -> Vec<libc::gid_t> {
        let Some(name) = &self.name else {
            return vec![gid];
        };
        let mut groups = vec![0 as libc::gid_t; 64];
        for _ in 0..4 {
            let mut count = i32::try_from(groups.len()).unwrap_or(i32::MAX);
            // SAFETY: name is NUL-terminated; groups holds `count` entries.
            let rc = unsafe {
                libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &raw mut count)
            };
            let count = usize::try_from(count).unwrap_or(0);
            if rc >= 0 {
                groups.truncate(count);
                return groups;
            }
            // Too small: count says how many there are.
            groups.resize(count.max(groups.len() * 2), 0);
        }
        vec![gid]
    }
}

/// A child process stopped just before it runs the command.
#[derive(Debug)]
pub struct StoppedChild {
    pid: libc::pid_t,
}

impl StoppedChild {
    /// Forks; the child stops itself, then execs `command` when resumed. Call this while the
    /// process is still single-threaded (before the async runtime starts).
    pub fn spawn(
        command: &[OsString],
        stdout_to_stderr: bool,
        run_as: Option<&RunAs>,
    ) -> Result<Self> {
        let argv: Vec<CString> = command
            .iter()
            .map(|arg| CString::new(arg.as_bytes()))
            .collect::<Result<_, _>>()
            .context("the command contains a NUL byte")?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let exec_failed = c"loopbpf: could not execute the command\n";
        let switch_failed = c"loopbpf: could not switch to the user to run the command as\n";

        // SAFETY: the child only makes async-signal-safe calls (dup2, setgroups, setgid,
        // setuid, raise, execvp, write, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork failed");
        }
        if pid == 0 {
            // SAFETY: see above; argv_ptrs is NULL-terminated and outlives the exec.
            unsafe {
                if stdout_to_stderr {
                    libc::dup2(2, 1);
                }
                // Groups first, then the gid, then the uid: each needs the privilege the
                // next one drops.
                if let Some(run_as) = run_as
                    && (libc::setgroups(run_as.groups.len(), run_as.groups.as_ptr()) != 0
                        || libc::setgid(run_as.gid) != 0
                        || libc::setuid(run_as.uid) != 0)
                {
                    libc::write(
                        2,
                        switch_failed.as_ptr().cast(),
                        switch_failed.count_bytes(),
                    );
                    libc::_exit(126);
                }
                libc::raise(libc::SIGSTOP);
                libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
                libc::write(2, exec_failed.as_ptr().cast(), exec_failed.count_bytes());
                libc::_exit(127);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child; status is a valid out pointer.
        let waited = unsafe { libc::waitpid(pid, &raw mut status, libc::WUNTRACED) };
        if waited == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 126 {
            let uid = run_as.map_or(0, |r| r.uid);
            bail!("the launched command could not run as uid {uid}: check --user");
        }
        if waited != pid || !libc::WIFSTOPPED(status) {
            bail!("the launched command did not start");
        }
        Ok(Self { pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid.cast_unsigned()
    }

    /// Lets the child exec the command.
    pub fn resume(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }

    /// Ends a child that never got to run (the probes could not be attached).
    pub fn kill(&self) {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }

    /// Ends the command we launched when profiling stops before it does (`--duration`,
    /// SIGTERM): SIGTERM, then SIGKILL if it is still there after `grace`.
    pub fn terminate(&self, grace: std::time::Duration) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            // SAFETY: polling our own child without reaping it.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    self.pid.cast_unsigned(),
                    &raw mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                );
                info.si_pid()
            };
            if rc == self.pid {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// Reaps the child if it has exited and returns its exit code (128 + signal if killed).
    pub fn try_exit_code(&self) -> Option<i32> {
        let mut status = 0;
        // SAFETY: reaping our own child without blocking.
        let waited = unsafe { libc::waitpid(self.pid, &raw mut status, libc::WNOHANG) };
        if waited != self.pid {
            return None;
        }
        if libc::WIFEXITED(status) {
            Some(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Some(128 + libc::WTERMSIG(status))
        } else {
            None
        }
    }
}
