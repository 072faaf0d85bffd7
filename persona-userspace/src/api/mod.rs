//! The REST API: JSON in and out, bearer tokens, an OpenAPI document at /openapi.json.
mod context;
mod error;
mod events;
mod extract;
mod metrics;
mod migrate;
mod objects;
mod openapi;
mod shift;
mod tokens;

use std::sync::Arc;

use axum::{
    Router,
    extract::{FromRequestParts, MatchedPath, Request},
    http::{Method, header::AUTHORIZATION, request::Parts},
    middleware::Next,
    response::{IntoResponse as _, Response},
    routing::{get, post},
};
pub use error::ApiError;

use crate::{
    auth::{Auth, AuthError, Caller},
    orchestrator::Orchestrator,
    store::Role,
};

pub struct AppState {
    pub auth: Auth,
    pub orchestrator: Arc<Orchestrator>,
    pub engine: Arc<crate::rules::runner::RuleEngine>,
    /// Long polls of /events waiting at once: each holds a connection and a task.
    pub waiting: tokio::sync::Semaphore,
}

/// Long polls allowed to wait at once; more are answered at once, with what there is.
pub const LONG_POLLS: usize = 256;

pub type State = axum::extract::State<Arc<AppState>>;

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(AuthError::Missing)?
            .trim()
            .to_owned();
        if let Some(caller) = state.auth.cached(&token) {
            return Ok(caller);
        }
        // Argon2 verification is CPU work: off the async threads (and a token seen
        // before costs a lookup, not a trip to the blocking pool and back).
        let state = state.clone();
        let caller = tokio::task::spawn_blocking(move || state.auth.verify(&token))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        Ok(caller)
    }
}

/// The role a route needs, `None` for the open ones: checked before anything reads the
/// request's body or query.
fn needed(method: &Method, route: &str) -> Option<Role> {
    match (method, route) {
        (_, "/healthz") => None,
        (&Method::GET, "/tokens") => Some(Role::Admin),
        (&Method::GET, _) => Some(Role::Viewer),
        (&Method::POST, "/context" | "/trigger_shift") => Some(Role::Operator),
        _ => Some(Role::Admin),
    }
}

/// Authenticates and authorizes every request by its route, before its handler's
/// extractors run: who may not call a route learns nothing about what its input
/// should have been.
async fn authorize(state: State, route: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route = route.as_ref().map_or("", |r| r.as_str());
    let Some(role) = needed(req.method(), route) else {
        return next.run(req).await;
    };
    let (mut parts, body) = req.into_parts();
    let caller = match Caller::from_request_parts(&mut parts, &state.0).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = caller.require(role) {
        return ApiError::from(e).into_response();
    }
    parts.extensions.insert(caller);
    next.run(Request::from_parts(parts, body)).await
}

/// A fleet host that does not follow etcd now answers from what it last saw, and says
/// so on every answer.
async fn mark_stale(state: State, req: Request, next: Next) -> axum::response::Response {
    let stale = state.orchestrator.fleet().is_some_and(|f| !f.connected());
    let mut response = next.run(req).await;
    if stale {
        response.headers_mut().insert(
            "persona-stale",
            axum::http::HeaderValue::from_static("etcd unreachable: as last seen"),
        );
    }
    response
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/openapi.json", get(openapi::document))
        .route(
            "/personas",
            get(objects::list_personas).post(objects::create_persona),
        )
        .route(
            "/personas/{id}",
            get(objects::get_persona)
                .put(objects::put_persona)
                .delete(objects::delete_persona),
        )
        .route(
            "/devices",
            get(objects::list_devices).post(objects::create_device),
        )
        .route(
            "/devices/{id}",
            get(objects::get_device)
                .put(objects::put_device)
                .delete(objects::delete_device),
        )
        .route(
            "/rules",
            get(objects::list_rules).post(objects::create_rule),
        )
        .route(
            "/rules/{id}",
            get(objects::get_rule)
                .put(objects::put_rule)
                .delete(objects::delete_rule),
        )
        .route(
            "/applications",
            get(objects::list_applications).post(objects::create_application),
        )
        .route(
            "/applications/{id}",
            get(objects::get_application)
                .put(objects::put_application)
                .delete(objects::delete_application),
        )
        .route("/devices/{id}/migrate", post(migrate::migrate))
        .route("/devices/{id}/cutover", post(migrate::cut_over))
        .route(
            "/devices/{id}/migration",
            get(migrate::show).delete(migrate::cancel),
        )
        .route("/metrics", get(metrics::scrape))
        .route("/context", post(context::push))
        .route("/explain/{id}", get(context::explain))
        .route("/status/{id}", get(objects::status))
        .route("/trigger_shift", post(shift::trigger_shift))
        .route("/events", get(events::list))
        .route("/tokens", get(tokens::list).post(tokens::create))
        .route("/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::count_requests,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            mark_stale,
        ))
        .with_state(state)
}
