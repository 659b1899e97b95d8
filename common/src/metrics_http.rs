//! The `/metrics` endpoint both daemons serve for Prometheus (`metrics_listen`): plain HTTP that
//! answers `GET /metrics` with what the daemon renders at that moment, and nothing else (404).
//! Metrics only: no control, no tenant data beyond its name and figures.
//!
//! `prometheus-client` writes OpenMetrics, which Prometheus asks for. Anyone else (curl,
//! `promtool check metrics`, older scrapers) gets Prometheus' classic text format, converted here:
//! a counter's HELP and TYPE name its `_total` sample, and there is no `# EOF`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header;

/// Renders the daemon's metrics in the OpenMetrics text format, afresh at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What `prometheus-client` writes; Prometheus negotiates it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Prometheus' classic text exposition format.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as Prometheus' classic text format: counters' HELP and TYPE lines name the
/// `_total` series (their samples already do), `# UNIT` and `# EOF` go.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{total} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsHttpError {
    #[error("metrics_listen: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving metrics on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound metrics listener: binding first makes a taken or bad address an error at start.
pub struct MetricsListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsHttpError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsHttpError::Bind { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Self { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` until `shutdown` resolves.
    pub async fn serve(
        self,
        render: Render,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), MetricsHttpError> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let render = render.clone();
                async move {
                    let wants_openmetrics = headers
                        .get(header::ACCEPT)
                        .and_then(|a| a.to_str().ok())
                        .is_some_and(|a| a.contains("application/openmetrics-text"));
                    let text = render();
                    if wants_openmetrics {
                        ([(header::CONTENT_TYPE, OPENMETRICS)], text)
                    } else {
                        ([(header::CONTENT_TYPE, CLASSIC)], to_classic(&text))
                    }
                }
            }),
        );
        let addr = self.addr;
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| MetricsHttpError::Serve { addr, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_total_series_and_has_no_eof() {
        let om = "# HELP a_things Things.\n# TYPE a_things counter\na_things_total 3\n\
                  # HELP b_bytes Bytes.\n# TYPE b_bytes gauge\n# UNIT b_bytes bytes\n\
                  b_bytes{node=\"x y\"} 1.0\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_things_total Things.\n# TYPE a_things_total counter\na_things_total 3\n\
             # HELP b_bytes Bytes.\n# TYPE b_bytes gauge\nb_bytes{node=\"x y\"} 1.0\n"
        );
    }
}
