//! Bearer tokens: who is calling and what their role allows.
//!
//! With tokens configured every `/v1` route needs `Authorization: Bearer <token>`
//! (401 `unauthenticated` without a known one); reads take a `read` or `operate`
//! token, everything else an `operate` token (403 `forbidden`). With none configured
//! the API is open and every caller is [`ANONYMOUS`]. Tokens are compared in
//! constant time and never logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::{HttpError, code};
use crate::config::{self, Role};

/// The caller's name when no tokens are configured.
pub const ANONYMOUS: &str = "anonymous";

/// Who made a request: the name of their token; handlers journal it.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<str>);

/// The configured tokens, resolved (files read).
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Arc<[(String, Role, Vec<u8>)]>,
    open_probes: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, ..)| n.as_str()).collect();
        f.debug_struct("Auth")
            .field("tokens", &names)
            .field("open_probes", &self.open_probes)
            .finish()
    }
}

impl Auth {
    /// Reads the tokens of `http` (their files included).
    ///
    /// # Errors
    ///
    /// [`config::Error`] naming the token whose file cannot be read or whose
    /// secret is too short.
    pub fn from_config(http: &config::Http) -> Result<Self, config::Error> {
        let tokens = http
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| Ok((t.name.clone(), t.role, t.secret(i)?.into_bytes())))
            .collect::<Result<Vec<_>, config::Error>>()?;
        Ok(Self {
            tokens: tokens.into(),
            open_probes: http.open_probes,
        })
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether the probes and metrics are served without a token.
    pub fn open_probes(&self) -> bool {
        self.open_probes || !self.enabled()
    }

    /// The caller a request authenticates as, if `needed` allows it.
    fn check(&self, request: &Request, needed: Role) -> Result<Caller, HttpError> {
        if !self.enabled() {
            return Ok(Caller(ANONYMOUS.into()));
        }
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                HttpError::new(
                    StatusCode::UNAUTHORIZED,
                    code::UNAUTHENTICATED,
                    "this route needs Authorization: Bearer <token>",
                )
            })?;
        // Every token is compared, so the time taken does not say which one matched.
        let mut found = None;
        for (name, role, secret) in self.tokens.iter() {
            if bool::from(secret.as_slice().ct_eq(presented.as_bytes())) {
                found = Some((name, *role));
            }
        }
        let Some((name, role)) = found else {
            return Err(HttpError::new(
                StatusCode::UNAUTHORIZED,
                code::UNAUTHENTICATED,
                "unknown token",
            ));
        };
        if needed == Role::Operate && role == Role::Read {
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                code::FORBIDDEN,
                format!("token {name} may only read; this route needs an operate token"),
            ));
        }
        Ok(Caller(name.as_str().into()))
    }
}

/// Middleware: reads need a `read` or `operate` token.
pub async fn read(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    guard(&auth, Role::Read, request, next).await
}

/// Middleware: changes need an `operate` token.
pub async fn operate(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    guard(&auth, Role::Operate, request, next).await
}

/// Middleware: the probes and metrics, open unless configured otherwise.
pub async fn probe(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    if auth.open_probes() {
        return next.run(request).await;
    }
    guard(&auth, Role::Read, request, next).await
}

async fn guard(auth: &Auth, needed: Role, mut request: Request, next: Next) -> Response {
    match auth.check(&request, needed) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}
