//! Live migration between the hosts of a fleet.
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    ApiError, State,
    extract::{Json, Path},
};
use crate::{
    auth::Caller,
    fleet::{
        Fleet,
        migration::{Cutover, describe},
    },
    store::{Kind, Role},
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The host to move the device to.
    pub to: String,
    /// The device's interface on that host; its interface now when not given.
    #[serde(default)]
    pub interface: Option<String>,
    /// When the target takes over: at the VM's first frame there (the default), or
    /// when asked.
    #[serde(default)]
    pub cutover: Option<Cutover>,
}

fn fleet(state: &State) -> Result<&std::sync::Arc<Fleet>, ApiError> {
    state.orchestrator.fleet().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "migration moves a device between the hosts of a fleet: this daemon runs alone (start it with --store etcd://...)",
        )
    })
}

/// Move a device to another host of the fleet without a gap (operator).
#[utoipa::path(post, path = "/devices/{id}/migrate", request_body = MigrateRequest, responses((status = 202, description = "Asked: the target takes it from here"), (status = 404), (status = 409, description = "A migration is under way"), (status = 503, description = "The target is not alive")), security(("bearer" = [])))]
pub async fn migrate(
    state: State,
    caller: Caller,
    Path(id): Path<String>,
    Json(req): Json<MigrateRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Operator)?;
    let fleet = fleet(&state)?;
    let spec = state
        .orchestrator
        .device(&id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("Device {id:?} not found")))?;
    let version = state
        .orchestrator
        .store()
        .stamp(Kind::Device, &id)?
        .map_or(0, |s| s.version);
    let m = fleet.migrate(
        (&id, &spec, version),
        &req.to,
        req.interface.as_deref(),
        req.cutover.unwrap_or(Cutover::FirstFrame),
        &caller.actor(),
    )?;
    Ok((StatusCode::ACCEPTED, Json(describe(&m))))
}

/// Cut a manual migration over now (operator).
#[utoipa::path(post, path = "/devices/{id}/cutover", responses((status = 200), (status = 404, description = "No migration under way"), (status = 409, description = "The target is not ready")), security(("bearer" = [])))]
pub async fn cut_over(
    state: State,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Operator)?;
    let m = fleet(&state)?.cut_over(&id)?;
    Ok(Json(describe(&m)))
}

/// Call the device's migration off before its cut-over: the target lets the device go
/// and it stays where it runs (operator).
#[utoipa::path(delete, path = "/devices/{id}/migration", responses((status = 202, description = "Asked: the target lets the device go"), (status = 404, description = "No migration under way"), (status = 409, description = "Cutting over already")), security(("bearer" = [])))]
pub async fn cancel(
    state: State,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Operator)?;
    let m = fleet(&state)?.cancel(&id, &caller.actor())?;
    Ok((StatusCode::ACCEPTED, Json(describe(&m))))
}

/// The device's migration under way, or else its last one.
#[utoipa::path(get, path = "/devices/{id}/migration", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn show(
    state: State,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    let m = fleet(&state)?.migration(&id)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("device {id:?} has never migrated"),
        )
    })?;
    Ok(Json(describe(&m)))
}
