//! The files in deploy/ checked against what consumes them: the Kubernetes API schemas
//! (kubernetes-validate), Grafana's dashboard model, promtool, and the exporter's own metric
//! names, port and arguments. No root needed; `scripts/install-deps.sh` installs the tools.

use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use loopbpf_tests::workspace;
use serde_json::Value;

/// What the `DaemonSet` runs, and the port Prometheus scrapes.
const EXPORTER_ARGS: &str = r#""--all", "--metrics", "0.0.0.0:9464""#;
const METRICS_PORT: &str = "9464";

/// Series the exporter serves that are counters or gauges.
const PLAIN_METRICS: &[&str] = &[
    "loopbpf_event_loop_time_seconds_total",
    "loopbpf_event_loop_utilization_ratio",
    "loopbpf_event_loop_iterations_total",
    "loopbpf_event_loop_blocked_seconds_total",
    "loopbpf_event_loop_blocked_cpu_wait_seconds_total",
    "loopbpf_event_loop_ongoing_block_seconds",
    "loopbpf_memory_after_major_gc_bytes",
    "loopbpf_leak_warnings_total",
    "loopbpf_processes_watched",
    "loopbpf_loop_threads_watched",
    "loopbpf_lost_events_total",
    "loopbpf_attach_failures_total",
    "loopbpf_cpu_seconds_total",
    "loopbpf_resident_memory_bytes",
];

/// Histograms the exporter serves: only their suffixed series exist in Prometheus.
const HISTOGRAMS: &[&str] = &[
    "loopbpf_event_loop_blocked_duration_seconds",
    "loopbpf_event_loop_iteration_busy_seconds",
    "loopbpf_gc_duration_seconds",
];
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

/// loopbpf's own health: an operator must see these on the dashboard.
const HEALTH_METRICS: &[&str] = &[
    "loopbpf_cpu_seconds_total",
    "loopbpf_resident_memory_bytes",
    "loopbpf_processes_watched",
    "loopbpf_lost_events_total",
    "loopbpf_attach_failures_total",
];

/// Grafana's built-in panel types.
const PANEL_TYPES: &[&str] = &[
    "row",
    "timeseries",
    "heatmap",
    "bargauge",
    "table",
    "stat",
    "gauge",
    "text",
    "barchart",
    "histogram",
    "piechart",
    "state-timeline",
    "status-history",
];

/// The capabilities the `DaemonSet` adds; `README.md` and the manifest's comments explain each.
const CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "SYS_RESOURCE",
    "DAC_READ_SEARCH",
    "CHECKPOINT_RESTORE",
];

/// The oldest Kubernetes with `securityContext.appArmorProfile`, and the newest the tool knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

#[test]
fn daemonset_manifest_validates_against_kubernetes_schemas() {
    let manifest = deploy_path("daemonset.yaml");
    let output = kubernetes_validate(&manifest);
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} does not validate:\n{report}{}",
        manifest.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    // The tool only warns about a kind it has no schema for, leaving it unchecked.
    assert!(!report.contains("WARN"), "unchecked resources:\n{report}");
    for version in KUBERNETES_VERSIONS {
        let minor = version.rsplit_once('.').unwrap().0;
        for resource in [
            "namespace/loopbpf",
            "serviceaccount/loopbpf",
            "daemonset/loopbpf",
            "networkpolicy/loopbpf",
        ] {
            let line = format!("passed for resource {resource} against version {minor}");
            assert!(report.contains(&line), "no `{line}` in:\n{report}");
        }
    }

    // Strict mode is what catches a misspelt field: make sure one is caught.
    let text = read_deploy("daemonset.yaml");
    let typo = text.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:");
    assert_ne!(typo, text, "daemonset.yaml sets no readOnlyRootFilesystem");
    let typo_path =
        env::temp_dir().join(format!("loopbpf-deploy-typo-{}.yaml", std::process::id()));
    fs::write(&typo_path, typo).unwrap();
    let output = kubernetes_validate(&typo_path);
    fs::remove_file(&typo_path).unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success() && report.contains("readOnlyRootFileSystem"),
        "a misspelt field passed validation:\n{report}"
    );
}

#[test]
fn daemonset_adds_only_the_documented_capabilities() {
    let text = read_deploy("daemonset.yaml");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let add = lines
        .iter()
        .position(|line| *line == "add:")
        .expect("daemonset.yaml adds no capabilities");
    let mut added = BTreeSet::new();
    let mut explained = true;
    for (i, line) in lines.iter().enumerate().skip(add + 1) {
        if let Some(capability) = line.strip_prefix("- ") {
            added.insert(capability.to_owned());
            explained &= lines[i - 1].starts_with('#');
        } else if !line.starts_with('#') {
            break;
        }
    }
    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|&c| c.to_owned()).collect();
    assert_eq!(added, expected, "capabilities added by daemonset.yaml");
    assert!(
        explained,
        "each added capability needs a comment saying why"
    );

    let settings: BTreeSet<&str> = lines
        .iter()
        .copied()
        .filter(|line| !line.starts_with('#'))
        .collect();
    for required in [
        "hostPID: true",
        "runAsUser: 0",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        r#"drop: ["ALL"]"#,
        "path: /sys/kernel/tracing",
    ] {
        assert!(
            settings.contains(required),
            "daemonset.yaml lacks `{required}`"
        );
    }
    // loopbpf pins nothing: the host's BPF filesystem would only be a way in.
    assert!(
        !text.contains("/sys/fs/bpf"),
        "daemonset.yaml mounts /sys/fs/bpf, which loopbpf does not use"
    );
    assert!(
        !settings.contains("privileged: true"),
        "daemonset.yaml runs privileged: the capability list is meant to replace that"
    );

    let readme = read_deploy("README.md");
    for capability in CAPABILITIES {
        assert!(
            readme.contains(&format!("`CAP_{capability}`")),
            "deploy/README.md does not say why CAP_{capability} is needed"
        );
    }
}

/// The `NetworkPolicy` of daemonset.yaml: the loopbpf pods admit only Prometheus, on the
/// metrics port, and reach out to nothing; the scraper's label is the one deploy/README.md
/// tells users to change.
#[test]
fn network_policy_admits_only_prometheus_on_the_metrics_port() {
    let text = read_deploy("daemonset.yaml");
    let policy = text
        .split("\n---\n")
        .find(|doc| doc.contains("kind: NetworkPolicy"))
        .expect("daemonset.yaml has no NetworkPolicy");
    let lines: Vec<&str> = policy
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let after = |key: &str| -> Vec<&str> {
        let at = lines
            .iter()
            .position(|l| *l == key)
            .unwrap_or_else(|| panic!("the NetworkPolicy has no `{key}`:\n{policy}"));
        lines[at + 1..].to_vec()
    };
    // It selects the DaemonSet's pods and governs both directions.
    assert_eq!(
        after("podSelector:")[..2],
        ["matchLabels:", "app.kubernetes.io/name: loopbpf"],
        "{policy}"
    );
    assert!(
        lines.contains(&"policyTypes: [Ingress, Egress]") && lines.contains(&"egress: []"),
        "the policy must deny all egress:\n{policy}"
    );
    // One ingress rule: Prometheus pods of any namespace, the metrics port only.
    let ingress = after("ingress:");
    assert_eq!(
        ingress,
        [
            "- from:",
            "- namespaceSelector: {}",
            "podSelector:",
            "matchLabels:",
            "app.kubernetes.io/name: prometheus",
            "ports:",
            "- port: metrics",
            "protocol: TCP",
            "egress: []",
        ],
        "{policy}"
    );
    let readme = read_deploy("README.md");
    assert!(
        readme.contains("`app.kubernetes.io/name: prometheus`")
            && readme.contains("ingress[0].from[0].podSelector.matchLabels"),
        "deploy/README.md does not say which pods may scrape and where to change that"
    );
}

#[test]
fn dashboard_is_valid_grafana_json() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    for key in ["uid", "title"] {
        assert!(
            dashboard[key].as_str().is_some_and(|s| !s.is_empty()),
            "dashboard has no {key}"
        );
    }

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no `datasource` variable of Prometheus data sources"
    );
    let variable_names: BTreeSet<&str> = variables
        .iter()
        .map(|v| v["name"].as_str().expect("variable name"))
        .collect();
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let definition = variable["definition"]
            .as_str()
            .expect("variable definition");
        check_metric_names(definition);
        check_variable_references(definition, &variable_names);
    }

    let mut ids = BTreeSet::new();
    let mut shown = String::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let kind = panel["type"].as_str().expect("panel type");
        assert!(
            PANEL_TYPES.contains(&kind),
            "panel `{title}` has unknown type {kind}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24) && grid["h"].is_u64(),
            "panel `{title}` has a bad gridPos: {grid}"
        );
        if kind == "row" {
            continue;
        }
        assert!(
            panel["datasource"]["uid"] == "${datasource}"
                && panel["datasource"]["type"] == "prometheus",
            "panel `{title}` does not use the datasource variable: {}",
            panel["datasource"]
        );
        let targets = panel["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel `{title}` has no queries");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel `{title}` has an empty query"
            );
            assert!(!expr.contains('\n'), "panel `{title}`: one line per query");
            check_metric_names(expr);
            check_variable_references(expr, &variable_names);
            shown.push_str(expr);
            shown.push('\n');
        }
    }
    for metric in HEALTH_METRICS {
        assert!(shown.contains(metric), "no panel shows {metric}");
    }
}

#[test]
fn dashboard_queries_parse_as_promql() {
    // Each query becomes a recording rule, which promtool parses without a server.
    let dashboard = dashboard();
    let rules: Vec<Value> = panels(&dashboard)
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .enumerate()
        .map(|(i, target)| {
            let expr = target["expr"].as_str().expect("expr");
            serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": as_prometheus_sees_it(expr) })
        })
        .collect();
    assert!(!rules.is_empty());
    let file = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    // JSON is YAML, which is what promtool reads.
    let path = env::temp_dir().join(format!(
        "loopbpf-dashboard-rules-{}.yml",
        std::process::id()
    ));
    fs::write(&path, file.to_string()).unwrap();
    let output = promtool(&["check", "rules", path.to_str().unwrap()]);
    fs::remove_file(&path).unwrap();
    assert!(
        output.status.success(),
        "dashboard queries do not parse:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn prometheus_config_passes_promtool() {
    // Debian's promtool is built without Kubernetes service discovery, so the job is checked
    // with a static target in its place: that still parses every relabeling rule.
    let text = read_deploy("prometheus.yml");
    let sd_start = text
        .find("    kubernetes_sd_configs:")
        .expect("prometheus.yml has no kubernetes_sd_configs");
    let sd_end = text
        .find("    relabel_configs:")
        .expect("no relabel_configs");
    assert!(sd_start < sd_end);
    let kubernetes_job = format!(
        "{}    static_configs:\n      - targets: [\"localhost:{METRICS_PORT}\"]\n{}",
        &text[..sd_start],
        &text[sd_end..]
    );

    // The commented-out job for one host, uncommented.
    let mut static_job = String::new();
    for line in text
        .lines()
        .skip_while(|line| !line.starts_with("  # - job_name:"))
        .take_while(|line| line.starts_with("  #"))
    {
        static_job.push_str(&line.replacen("# ", "", 1));
        static_job.push('\n');
    }
    assert!(
        static_job.contains(&format!("localhost:{METRICS_PORT}")),
        "prometheus.yml has no commented static job for localhost:{METRICS_PORT}"
    );

    for (name, config) in [
        ("kubernetes", kubernetes_job),
        ("static", format!("scrape_configs:\n{static_job}")),
    ] {
        let path = env::temp_dir().join(format!(
            "loopbpf-prometheus-{name}-{}.yml",
            std::process::id()
        ));
        fs::write(&path, &config).unwrap();
        let output = promtool(&["check", "config", path.to_str().unwrap()]);
        fs::remove_file(&path).unwrap();
        assert!(
            output.status.success(),
            "the {name} job of prometheus.yml does not pass promtool:\n{}{}\n{config}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn containerfile_and_scrape_config_agree_with_the_manifest() {
    let daemonset = read_deploy("daemonset.yaml");
    let containerfile = read_deploy("Containerfile");
    let prometheus = read_deploy("prometheus.yml");
    let podmonitor = read_deploy("podmonitor.yaml");
    let expect = |file: &str, text: &str, needle: &str| {
        assert!(text.contains(needle), "{file} lacks `{needle}`");
    };

    // The same command and port everywhere.
    expect(
        "daemonset.yaml",
        &daemonset,
        &format!("args: [{EXPORTER_ARGS}]"),
    );
    expect(
        "Containerfile",
        &containerfile,
        &format!("CMD [{EXPORTER_ARGS}]"),
    );
    expect(
        "daemonset.yaml",
        &daemonset,
        r#"command: ["/usr/local/bin/loopbpf"]"#,
    );
    expect(
        "Containerfile",
        &containerfile,
        r#"ENTRYPOINT ["/usr/local/bin/loopbpf"]"#,
    );
    expect(
        "Containerfile",
        &containerfile,
        &format!("EXPOSE {METRICS_PORT}"),
    );
    expect(
        "daemonset.yaml",
        &daemonset,
        &format!("containerPort: {METRICS_PORT}"),
    );
    expect(
        "daemonset.yaml",
        &daemonset,
        &format!("prometheus.io/port: \"{METRICS_PORT}\""),
    );
    expect(
        "daemonset.yaml",
        &daemonset,
        "prometheus.io/scrape: \"true\"",
    );
    expect(
        "prometheus.yml",
        &prometheus,
        &format!("localhost:{METRICS_PORT}"),
    );

    // Prometheus finds the pods the DaemonSet makes.
    for needle in [
        "role: pod",
        "names: [loopbpf]",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape",
        "__meta_kubernetes_pod_annotation_prometheus_io_port",
        "__meta_kubernetes_pod_node_name",
        "target_label: node",
    ] {
        expect("prometheus.yml", &prometheus, needle);
    }
    expect("daemonset.yaml", &daemonset, "namespace: loopbpf");
    for needle in [
        "kind: PodMonitor",
        "namespace: loopbpf",
        "app.kubernetes.io/name: loopbpf",
        "port: metrics",
        "targetLabel: node",
    ] {
        expect("podmonitor.yaml", &podmonitor, needle);
    }
    expect(
        "daemonset.yaml",
        &daemonset,
        "app.kubernetes.io/name: loopbpf",
    );
    expect("daemonset.yaml", &daemonset, "- name: metrics");

    // The image builds with the toolchain and clang the workspace asks for.
    let manifest = fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let rust = quoted_after(&manifest, "rust-version = ").expect("workspace rust-version");
    expect(
        "Containerfile",
        &containerfile,
        &format!("rust:{rust}-bookworm"),
    );
    let build_rs = fs::read_to_string(workspace().join("loopbpf/build.rs")).unwrap();
    let clang = build_rs
        .find("\"clang-")
        .and_then(|at| quoted_after(&build_rs[at..], ""))
        .expect("build.rs names no clang-NN");
    expect("Containerfile", &containerfile, clang);
    expect(
        "Containerfile",
        &containerfile,
        "cargo build --release --locked -p loopbpf",
    );
}

fn deploy_path(name: &str) -> PathBuf {
    workspace().join("deploy").join(name)
}

fn read_deploy(name: &str) -> String {
    let path = deploy_path(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read_deploy("grafana-dashboard.json"))
        .unwrap_or_else(|e| panic!("grafana-dashboard.json is not JSON: {e}"))
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// Panics on a `loopbpf_*` name the exporter does not serve.
fn check_metric_names(expr: &str) {
    for name in metric_names(expr) {
        let served = PLAIN_METRICS.contains(&name)
            || HISTOGRAMS.iter().any(|histogram| {
                name.strip_prefix(histogram)
                    .is_some_and(|suffix| HISTOGRAM_SUFFIXES.contains(&suffix))
            });
        assert!(served, "`{expr}` uses {name}, which loopbpf does not serve");
    }
}

/// The `loopbpf_[a-z_]+` names in a query.
fn metric_names(expr: &str) -> Vec<&str> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.match_indices("loopbpf_")
        .filter(|&(at, _)| !expr[..at].ends_with(is_name_char))
        .map(|(at, _)| {
            let rest = &expr[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// Grafana's interval variables are fine anywhere; a template variable only as a whole regex
/// matcher value (`label=~"$var"`), where "All" becomes `.*` and multiple values `a|b`.
fn check_variable_references(expr: &str, defined: &BTreeSet<&str>) {
    for (at, _) in expr.match_indices('$') {
        let (name, after) = variable_at(&expr[at + 1..]);
        if name.starts_with("__") {
            assert!(
                ["__rate_interval", "__range", "__interval"].contains(&name),
                "`{expr}` uses ${name}"
            );
            continue;
        }
        assert!(defined.contains(name), "`{expr}` uses undefined ${name}");
        assert!(
            expr[..at].ends_with("=~\"") && after.starts_with('"'),
            "`{expr}`: use ${name} only as `label=~\"${name}\"`"
        );
    }
}

/// The variable name right after a `$` (`name` or `{name}`), and the text after it.
fn variable_at(text: &str) -> (&str, &str) {
    if let Some(braced) = text.strip_prefix('{') {
        let end = braced.find('}').expect("unclosed ${");
        let name = braced[..end].split(':').next().unwrap();
        (name, &braced[end + 1..])
    } else {
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(text.len());
        (&text[..end], &text[end..])
    }
}

/// The query as Grafana sends it, with "All" selected in every variable.
fn as_prometheus_sees_it(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$__interval", "15s");
    while let Some(at) = out.find('$') {
        let (_, after) = variable_at(&out[at + 1..]);
        let end = out.len() - after.len();
        out.replace_range(at..end, ".*");
    }
    out
}

/// The double-quoted value after `key` in `text`.
fn quoted_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// Runs kubernetes-validate in strict mode on `manifest` for each of [`KUBERNETES_VERSIONS`].
fn kubernetes_validate(manifest: &Path) -> Output {
    let tool = kubernetes_validate_path();
    let mut command = Command::new(&tool);
    command.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        command.args(["-k", version]);
    }
    command.arg(manifest).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): run scripts/install-deps.sh as root",
            tool.display()
        )
    })
}

/// `$LOOPBPF_KUBERNETES_VALIDATE`, else the venv install-deps.sh makes, else PATH.
fn kubernetes_validate_path() -> PathBuf {
    if let Some(path) = env::var_os("LOOPBPF_KUBERNETES_VALIDATE") {
        return PathBuf::from(path);
    }
    let cache = env::var_os("LOOPBPF_PY_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/loopbpf-py"), PathBuf::from);
    let installed = cache.join("bin/kubernetes-validate");
    if installed.is_file() {
        return installed;
    }
    on_path("kubernetes-validate").unwrap_or_else(|| {
        panic!(
            "kubernetes-validate is not installed (looked in {} and PATH): run scripts/install-deps.sh as root",
            installed.display()
        )
    })
}

fn promtool(args: &[&str]) -> Output {
    let tool = on_path("promtool").unwrap_or_else(|| {
        panic!("promtool is not installed: run scripts/install-deps.sh as root (Debian package prometheus)")
    });
    Command::new(&tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()))
}

fn on_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
