//! Launching `loopbpf -- COMMAND`: the child stops itself before `exec`, so the probes are in
//! place (they follow the pid across `exec`) before its first loop iteration.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt,
};

use anyhow::{Context, Result, bail};

/// A child process stopped just before it runs the command.
#[derive(Debug)]
pub struct StoppedChild {
    pid: libc::pid_t,
}

impl StoppedChild {
    /// Forks; the child stops itself, then execs `command` when resumed. Call this while the
    /// process is still single-threaded (before the async runtime starts).
    pub fn spawn(command: &[OsString], stdout_to_stderr: bool) -> Result<Self> {
        let argv: Vec<CString> = command
            .iter()
            .map(|arg| CString::new(arg.as_bytes()))
            .collect::<Result<_, _>>()
            .context("the command contains a NUL byte")?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let exec_failed = c"loopbpf: could not execute the command\n";

        // SAFETY: the child only makes async-signal-safe calls (dup2, raise, execvp, write,
        // _exit) on memory prepared before the fork.
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
                libc::raise(libc::SIGSTOP);
                libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
                libc::write(2, exec_failed.as_ptr().cast(), exec_failed.count_bytes());
                libc::_exit(127);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child; status is a valid out pointer.
        let waited = unsafe { libc::waitpid(pid, &raw mut status, libc::WUNTRACED) };
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
