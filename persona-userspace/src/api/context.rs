//! Context signals in, and the engine's reasons out.
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Value, json, value::RawValue};

use super::{
    ApiError, State,
    extract::{Json, Path},
};
use crate::{
    auth::Caller,
    model::FieldError,
    rules::{runner::Applied, signals::Signal},
    store::{Kind, Role},
};

/// What POST /context answers: the decision for each device the signals concern (without
/// every rule's verdict, which is /explain's to give), serialized as it stands.
#[derive(Serialize)]
struct Pushed {
    accepted: usize,
    devices: Vec<Applied>,
}

/// Push context signals (operator): all are checked first, then taken in together, and
/// the devices they concern are re-evaluated before this returns.
#[utoipa::path(post, path = "/context", request_body = Object, responses((status = 200, description = "What the engine decided and did per device"), (status = 422)), security(("bearer" = [])))]
pub async fn push(
    state: State,
    caller: Caller,
    Json(body): Json<Box<RawValue>>,
) -> Result<Json<impl Serialize>, ApiError> {
    caller.require(Role::Operator)?;
    // Each element read straight into a signal, with its index for the errors.
    let raw: Vec<&RawValue> = match body.get().starts_with('[') {
        true => serde_json::from_str(body.get())
            .map_err(|e| ApiError::from(FieldError::new("signals", e.to_string())))?,
        false => vec![&*body],
    };
    let store = state.orchestrator.store();
    let mut signals = Vec::with_capacity(raw.len());
    for (i, v) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("signals[{i}].{f}");
        let s: Signal = serde_json::from_str(v.get())
            .map_err(|e| ApiError::from(FieldError::new(format!("signals[{i}]"), e.to_string())))?;
        s.validate()
            .map_err(|e| ApiError::from(FieldError::new(at(&e.field), e.reason)))?;
        if store.stamp(Kind::Device, &s.device)?.is_none() {
            return Err(
                FieldError::new(at("device"), format!("no Device named {:?}", s.device)).into(),
            );
        }
        signals.push(s);
    }
    let accepted = signals.len();
    let mut devices = state.engine.ingest(signals).await?;
    for a in &mut devices {
        a.decision.rules.clear();
    }
    Ok(Json(Pushed { accepted, devices }))
}

/// Every rule, whether it selects and matches the device, and why (viewer).
#[utoipa::path(get, path = "/explain/{id}", params(("id" = String, Path)), responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn explain(
    state: State,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    match state.engine.explain(&id).await? {
        Some(d) => Ok(Json(json!(d))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Device {id:?} not found"),
        )),
    }
}
