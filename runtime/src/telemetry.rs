//! The `[telemetry]` section and its setup: `tracing` logs to stderr (text or JSON, with a
//! filter) and, when an endpoint is configured, OTLP trace export (gRPC or HTTP/protobuf), with
//! the service name, sampling ratio and resource attributes from the section.
//!
//! The tracer provider is also installed as OpenTelemetry's global one, so a service can emit
//! spans of its own with explicit times and ids ([`with_ids`]): the orchestrator's saga spans
//! are derived from what the saga persisted, not from in-memory state.

use std::cell::Cell;
use std::collections::BTreeMap;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config;

/// Logs and traces: the same `[telemetry]` section in every binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Telemetry {
    /// OTLP endpoint for traces (e.g. `http://127.0.0.1:4317` for gRPC,
    /// `http://127.0.0.1:4318` for HTTP, where `/v1/traces` is added to a URL without a
    /// path); empty: no export, and no span is built for it.
    pub otlp_endpoint: String,
    /// `grpc` or `http/protobuf`.
    pub otlp_protocol: String,
    /// The `service.name` of the exported spans; empty: the binary's name.
    pub service_name: String,
    /// The share of new traces recorded, from 0 to 1; a span with a parent follows its
    /// parent's decision (so a saga's trace is recorded whole or not at all).
    pub sampling_ratio: f64,
    /// Further resource attributes of the exported spans (e.g. `deployment.environment`).
    pub resource_attributes: BTreeMap<String, String>,
    /// `text` or `json` log lines.
    pub log_format: String,
    /// Log filter (`RUST_LOG` syntax), e.g. `info` or `jetsaga_participant=debug`. It also
    /// filters the spans made with `tracing` (the participants' handling span is at `info`).
    pub log_filter: String,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_protocol: "grpc".to_owned(),
            service_name: String::new(),
            sampling_ratio: 1.0,
            resource_attributes: BTreeMap::new(),
            log_format: "text".to_owned(),
            log_filter: "info".to_owned(),
        }
    }
}

impl Telemetry {
    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), config::Error> {
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(config::Error::field(
                "telemetry.log-format",
                "must be \"text\" or \"json\"",
            ));
        }
        if let Err(e) = EnvFilter::try_new(&self.log_filter) {
            return Err(config::Error::field("telemetry.log-filter", e.to_string()));
        }
        if !matches!(self.otlp_protocol.as_str(), "grpc" | "http/protobuf") {
            return Err(config::Error::field(
                "telemetry.otlp-protocol",
                "must be \"grpc\" or \"http/protobuf\"",
            ));
        }
        let endpoint = &self.otlp_endpoint;
        if !(endpoint.is_empty()
            || endpoint.starts_with("http://")
            || endpoint.starts_with("https://"))
        {
            return Err(config::Error::field(
                "telemetry.otlp-endpoint",
                "must be an http:// or https:// URL (or empty: no export)",
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(config::Error::field(
                "telemetry.sampling-ratio",
                "must be between 0 and 1",
            ));
        }
        if self.resource_attributes.keys().any(String::is_empty) {
            return Err(config::Error::field(
                "telemetry.resource-attributes",
                "an attribute name is empty",
            ));
        }
        Ok(())
    }

    /// The endpoint the exporter is given: an HTTP one without a path gets `/v1/traces`.
    fn export_endpoint(&self) -> String {
        let endpoint = self.otlp_endpoint.clone();
        if self.otlp_protocol != "http/protobuf" {
            return endpoint;
        }
        let after_scheme = endpoint.split_once("://").map_or("", |(_, rest)| rest);
        match after_scheme.split_once('/') {
            Some((_, path)) if !path.is_empty() => endpoint,
            Some(_) => format!("{endpoint}v1/traces"),
            None => format!("{endpoint}/v1/traces"),
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log filter does not parse.
    #[error("telemetry.log-filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter cannot be built from the endpoint.
    #[error("telemetry.otlp-endpoint: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber is already installed.
    #[error("logging: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

/// Flushes traces when dropped (at the end of `main`).
#[derive(Debug)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber for `service`, and the W3C trace-context propagator.
///
/// # Errors
///
/// [`Error`] naming the setting that cannot be used.
pub fn init(service: &'static str, config: &Telemetry) -> Result<Guard, Error> {
    let filter = EnvFilter::try_new(&config.log_filter)?;
    let fmt = match config.log_format.as_str() {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = if config.otlp_endpoint.is_empty() {
        None
    } else {
        use opentelemetry_otlp::WithExportConfig;
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let exporter = match config.otlp_protocol.as_str() {
            "http/protobuf" => builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(config.export_endpoint())
                .build()?,
            _ => builder
                .with_tonic()
                .with_endpoint(config.export_endpoint())
                .build()?,
        };
        let name = if config.service_name.is_empty() {
            service.to_owned()
        } else {
            config.service_name.clone()
        };
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(name)
            .with_attributes(
                config
                    .resource_attributes
                    .iter()
                    .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .with_sampler(sampler)
            .with_id_generator(Ids::default())
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        Some(provider)
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(Guard { provider })
}

thread_local! {
    /// The ids the next span built on this thread takes (see [`with_ids`]).
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Builds a span with the given ids: `build` must start exactly one span, synchronously, with
/// the installed provider. The trace id is used only when the span has no parent (a child
/// takes its parent's). The OpenTelemetry SDK always draws ids from its generator, so spans
/// whose ids are derived from persisted state (the same span emitted by whichever instance
/// gets there) go through this.
pub fn with_ids<R>(trace_id: TraceId, span_id: SpanId, build: impl FnOnce() -> R) -> R {
    NEXT_IDS.with(|ids| ids.set(Some((trace_id, span_id))));
    let built = build();
    NEXT_IDS.with(|ids| ids.set(None));
    built
}

/// Random ids, unless [`with_ids`] set the next ones.
#[derive(Debug, Default)]
struct Ids {
    random: RandomIdGenerator,
}

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_IDS.with(Cell::get) {
            Some((trace_id, _)) => trace_id,
            None => self.random.new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match NEXT_IDS.with(Cell::get) {
            Some((_, span_id)) => span_id,
            None => self.random.new_span_id(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_names_each_invalid_field() {
        assert!(Telemetry::default().validate().is_ok());
        let mut resource = BTreeMap::new();
        resource.insert(String::new(), "x".to_owned());
        let cases = [
            (
                "telemetry.otlp-protocol",
                Telemetry {
                    otlp_protocol: "thrift".into(),
                    ..Telemetry::default()
                },
            ),
            (
                "telemetry.otlp-endpoint",
                Telemetry {
                    otlp_endpoint: "jaeger:4317".into(),
                    ..Telemetry::default()
                },
            ),
            (
                "telemetry.sampling-ratio",
                Telemetry {
                    sampling_ratio: 1.5,
                    ..Telemetry::default()
                },
            ),
            (
                "telemetry.sampling-ratio",
                Telemetry {
                    sampling_ratio: f64::NAN,
                    ..Telemetry::default()
                },
            ),
            (
                "telemetry.resource-attributes",
                Telemetry {
                    resource_attributes: resource,
                    ..Telemetry::default()
                },
            ),
        ];
        for (field, telemetry) in cases {
            let error = telemetry.validate().unwrap_err();
            assert_eq!(error.field_name(), Some(field), "{error}");
        }
    }

    #[test]
    fn an_http_endpoint_without_a_path_gets_the_traces_path() {
        let endpoint = |protocol: &str, url: &str| {
            Telemetry {
                otlp_protocol: protocol.into(),
                otlp_endpoint: url.into(),
                ..Telemetry::default()
            }
            .export_endpoint()
        };
        assert_eq!(endpoint("grpc", "http://j:4317"), "http://j:4317");
        for url in ["http://j:4318", "http://j:4318/"] {
            assert_eq!(endpoint("http/protobuf", url), "http://j:4318/v1/traces");
        }
        assert_eq!(
            endpoint("http/protobuf", "https://c/otlp/v1/traces"),
            "https://c/otlp/v1/traces"
        );
    }

    #[test]
    fn ids_are_the_ones_asked_for_inside_with_ids_and_random_outside() {
        let ids = Ids::default();
        let (trace_id, span_id) = (TraceId::from(7u128), SpanId::from(9u64));
        with_ids(trace_id, span_id, || {
            assert_eq!(ids.new_trace_id(), trace_id);
            assert_eq!(ids.new_span_id(), span_id);
        });
        assert_ne!(ids.new_span_id(), span_id);
        assert_ne!(ids.new_trace_id(), trace_id);
    }
}
