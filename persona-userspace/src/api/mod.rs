//! The REST API: JSON in and out, bearer tokens, an OpenAPI document at /openapi.json.
mod context;
mod error;
mod events;
mod metrics;
mod objects;
mod openapi;
mod shift;
mod tokens;

use std::sync::Arc;

use axum::{
    Router,
    extract::FromRequestParts,
    http::{header::AUTHORIZATION, request::Parts},
    routing::{get, post},
};
pub use error::ApiError;

use crate::{
    auth::{Auth, AuthError, Caller},
    orchestrator::Orchestrator,
};

pub struct AppState {
    pub auth: Auth,
    pub orchestrator: Arc<Orchestrator>,
    pub engine: Arc<crate::rules::runner::RuleEngine>,
}

pub type State = axum::extract::State<Arc<AppState>>;

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
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
        // Argon2 verification is CPU work: off the async threads.
        let state = state.clone();
        let caller = tokio::task::spawn_blocking(move || state.auth.verify(&token))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        Ok(caller)
    }
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
            metrics::count_requests,
        ))
        .with_state(state)
}
