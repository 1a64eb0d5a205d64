//! Which container and Kubernetes pod a process runs in, from its cgroup path: the labels fleet
//! mode puts on a process's blocks and metrics.
//!
//! Runtimes name a container's cgroup after its 64-hex-digit id (`docker-<id>.scope`,
//! `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`, `/docker/<id>`), and the
//! kubelet puts it under a pod's cgroup (`kubepods-burstable-pod<uid>.slice`, `/kubepods/
//! burstable/pod<uid>/`). The pod's name is not in the path; a pod's containers get it as their
//! hostname, which the process's environment holds.

use super::proc::Process;

/// Where a process runs; empty strings where it cannot be told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The container id, shortened to 12 digits as `docker ps` and `crictl ps` show it.
    pub container: String,
    /// The pod's name when it can be read, else its uid.
    pub pod: String,
}

impl Placement {
    /// Reads `/proc/PID/cgroup` (and the environment, for a pod's name).
    pub fn of(pid: u32) -> Self {
        let process = Process::new(pid);
        let Some(cgroup) = process.cgroup() else {
            return Self::default();
        };
        let mut placement = Self::from_cgroup(&cgroup);
        if !placement.pod.is_empty()
            && let Some(name) = process.environ_var("HOSTNAME")
        {
            placement.pod = name;
        }
        placement
    }

    /// The container id and pod uid in `/proc/PID/cgroup` text (v2's `0::PATH` or v1 lines).
    pub(super) fn from_cgroup(text: &str) -> Self {
        let mut placement = Self::default();
        for line in text.lines() {
            let path = line.splitn(3, ':').nth(2).unwrap_or_default();
            for part in path.split('/') {
                if placement.container.is_empty()
                    && let Some(id) = container_id(part)
                {
                    id[..12].clone_into(&mut placement.container);
                }
                if placement.pod.is_empty()
                    && let Some(uid) = pod_uid(part)
                {
                    placement.pod = uid;
                }
            }
        }
        placement
    }
}

/// A run of exactly 64 hex digits in a cgroup path component.
fn container_id(part: &str) -> Option<&str> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    let id = part.rsplit(['-', ':']).next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The pod uid of `pod<uid>` or `kubepods-<class>-pod<uid>.slice` (where the systemd driver
/// writes the uid's dashes as underscores).
fn pod_uid(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let (_, uid) = part.rsplit_once("pod")?;
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1e0c5bd2a94f7e8c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";

    #[test]
    fn kubernetes_with_the_systemd_driver() {
        let cgroup = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(
            Placement::from_cgroup(&cgroup),
            Placement {
                container: ID[..12].to_owned(),
                pod: "0a1b2c3d-4e5f-6789-abcd-ef0123456789".to_owned(),
            }
        );
    }

    #[test]
    fn kubernetes_with_the_cgroupfs_driver_and_v1_lines() {
        let cgroup = format!(
            "12:memory:/kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}\n1:name=systemd:/kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}\n"
        );
        let placement = Placement::from_cgroup(&cgroup);
        assert_eq!(placement.container, &ID[..12]);
        assert_eq!(placement.pod, "0a1b2c3d-4e5f-6789-abcd-ef0123456789");
    }

    #[test]
    fn docker_and_podman() {
        for path in [
            format!("0::/system.slice/docker-{ID}.scope"),
            format!("0::/docker/{ID}"),
            format!("0::/machine.slice/libpod-{ID}.scope/container"),
            format!("0::/crio-{ID}.scope"),
        ] {
            let placement = Placement::from_cgroup(&path);
            assert_eq!(placement.container, &ID[..12], "{path}");
            assert_eq!(placement.pod, "", "{path}");
        }
    }

    #[test]
    fn a_host_process_has_neither() {
        for path in [
            "0::/user.slice/user-1000.slice/session-2.scope",
            "0::/",
            "0::/system.slice/nginx.service",
        ] {
            assert_eq!(Placement::from_cgroup(path), Placement::default(), "{path}");
        }
    }
}
