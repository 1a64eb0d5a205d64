//! The export's settings: `--otlp`, `--service-name` and the standard variables
//! (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_BSP_*`), read the way the OTLP exporter specification says.

use std::time::Duration;

use anyhow::{Result, bail};

use super::span::{MAX_NAME, bounded};

/// Spans waiting for export at most (`OTEL_BSP_MAX_QUEUE_SIZE`); more are dropped and counted.
const MAX_QUEUE: usize = 2048;
/// Spans in one export at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
const MAX_BATCH: usize = 512;
/// How long a span waits for others to share its export (`OTEL_BSP_SCHEDULE_DELAY`, in ms).
const SCHEDULE_DELAY: Duration = Duration::from_secs(1);

/// Which OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    HttpProtobuf,
}

impl Transport {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Where and how to export, from the command line and the standard environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The full URL spans are sent to (`/v1/traces` appended for HTTP where the spec says).
    pub endpoint: String,
    pub transport: Transport,
    /// `--service-name`, else `OTEL_SERVICE_NAME`; `None`: each process's name.
    pub service_name: Option<String>,
    pub max_queue: usize,
    pub max_batch: usize,
    pub schedule_delay: Duration,
}

impl Config {
    /// The export configured by `--otlp ENDPOINT`, `--service-name` and the environment, or
    /// `None` when neither `--otlp` nor an `OTEL_EXPORTER_OTLP_*ENDPOINT` variable asks for it.
    pub fn resolve(
        flag: Option<&str>,
        service_name: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>> {
        let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_else(|| "http/protobuf".to_owned());
        let transport = match protocol.trim() {
            "grpc" => Transport::Grpc,
            "http/protobuf" => Transport::HttpProtobuf,
            other => bail!(
                "OTLP protocol `{other}` is not supported: set OTEL_EXPORTER_OTLP_PROTOCOL to grpc or http/protobuf"
            ),
        };
        // The signal's own variable is the URL as it is; the general one (and --otlp, which
        // stands for it) is a base to which HTTP adds the signal's path.
        let (endpoint, is_base) = if let Some(flag) = flag {
            (flag.trim().to_owned(), true)
        } else if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            (url.trim().to_owned(), false)
        } else if let Some(url) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            (url.trim().to_owned(), true)
        } else {
            return Ok(None);
        };
        let endpoint = check_endpoint(&endpoint)?;
        let endpoint = if is_base && transport == Transport::HttpProtobuf {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        } else {
            endpoint
        };
        let number = |name: &str, default: usize| -> Result<usize> {
            match env(name) {
                None => Ok(default),
                Some(text) => match text.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("{name}=`{text}` is not a positive whole number"),
                },
            }
        };
        let max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE)?.min(1 << 16);
        let max_batch = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", MAX_BATCH)?.min(max_queue);
        let delay_ms = number(
            "OTEL_BSP_SCHEDULE_DELAY",
            SCHEDULE_DELAY.as_millis() as usize,
        )?;
        let service_name = service_name
            .map(str::to_owned)
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .map(|name| bounded(&name, MAX_NAME).into_owned());
        Ok(Some(Self {
            endpoint,
            transport,
            service_name,
            max_queue,
            max_batch,
            schedule_delay: Duration::from_millis(delay_ms.min(60_000) as u64),
        }))
    }
}

/// An `http://host:port[/path]` URL; a clear message for anything else.
fn check_endpoint(url: &str) -> Result<String> {
    let Some(rest) = url.strip_prefix("http://") else {
        if url.starts_with("https://") {
            bail!(
                "OTLP endpoint `{url}`: this build of loopbpf has no TLS; send to a collector over http:// (a local agent or sidecar)"
            );
        }
        bail!("OTLP endpoint `{url}` is not a URL: write it as http://HOST:PORT");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || url.parse::<hyper::Uri>().is_err() {
        bail!("OTLP endpoint `{url}` is not a URL: write it as http://HOST:PORT");
    }
    Ok(url.to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Option<Config>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::resolve(flag, None, |name| vars.get(name).cloned())
    }

    #[test]
    fn endpoints_follow_the_otlp_exporter_spec() {
        assert_eq!(resolve(None, &[]).unwrap(), None, "nothing asks for it");
        let http = resolve(Some("http://collector:4318"), &[])
            .unwrap()
            .unwrap();
        assert_eq!(http.transport, Transport::HttpProtobuf);
        assert_eq!(http.endpoint, "http://collector:4318/v1/traces");
        let base = resolve(
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/otlp/")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(base.endpoint, "http://collector:4318/otlp/v1/traces");
        let signal = resolve(
            None,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:1"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/custom"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(signal.endpoint, "http://c:4318/custom", "taken as it is");
        let grpc = resolve(
            Some("http://collector:4317"),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(grpc.transport, Transport::Grpc);
        assert_eq!(grpc.endpoint, "http://collector:4317");
        let traces_protocol = resolve(
            Some("http://c:4317"),
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(traces_protocol.transport, Transport::Grpc);
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let error = |flag, vars: &[(&str, &str)]| resolve(flag, vars).unwrap_err().to_string();
        assert!(
            error(
                Some("http://c:4318"),
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]
            )
            .contains("`http/json` is not supported"),
        );
        assert!(error(Some("https://c:4318"), &[]).contains("no TLS"));
        assert!(error(Some("collector:4318"), &[]).contains("write it as http://HOST:PORT"));
        assert!(error(Some("http://"), &[]).contains("is not a URL"));
        assert!(
            error(Some("http://c:1"), &[("OTEL_BSP_MAX_QUEUE_SIZE", "-3")])
                .contains("OTEL_BSP_MAX_QUEUE_SIZE=`-3` is not a positive whole number")
        );
    }

    #[test]
    fn service_name_flag_beats_the_environment() {
        let vars = |name: &str| (name == "OTEL_SERVICE_NAME").then(|| "from-env".to_owned());
        let flag = Config::resolve(Some("http://c:1"), Some("payments"), vars)
            .unwrap()
            .unwrap();
        assert_eq!(flag.service_name.as_deref(), Some("payments"));
        let env = Config::resolve(Some("http://c:1"), None, vars)
            .unwrap()
            .unwrap();
        assert_eq!(env.service_name.as_deref(), Some("from-env"));
    }
}
