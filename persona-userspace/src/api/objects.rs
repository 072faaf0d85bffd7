//! Personas and devices: create, read, update (with version checks), delete.
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, State,
    extract::{Json, Path, Query},
};
use crate::{
    auth::Caller,
    datapath::compile,
    keys::KeyDir,
    model::{DeviceSpec, FieldError, PersonaSpec},
    rules::{RuleSpec, apps::ApplicationSpec},
    store::{EventBody, Expect, Kind, Record, Role},
};

/// A manifest as JSON: `kind` and `apiVersion` are optional here, the path says which.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Body {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    metadata: Metadata,
    /// The kind's spec, as in its YAML manifest.
    #[schema(value_type = Object)]
    spec: Value,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    #[schema(pattern = "^[a-z0-9-]{1,63}$")]
    name: String,
    /// For updates: the version read; a stale one is refused with 409.
    #[serde(default)]
    version: Option<u64>,
}

fn view(r: &Record) -> Value {
    json!({
        "apiVersion": crate::model::API_VERSION,
        "kind": r.kind.label(),
        "metadata": { "name": r.name, "version": r.version, "updated": r.updated },
        "spec": r.spec,
    })
}

/// A stored object as the API shows it; a device with what it runs now (its persona,
/// generation and leased addresses) under `status`.
fn view_in(store: &dyn crate::store::Store, r: &Record) -> Result<Value, ApiError> {
    let mut v = view(r);
    if r.kind == Kind::Device
        && let Some(s) = store.device_state(&r.name)?
    {
        v["status"] = json!({
            "persona": s.persona,
            "generation": s.generation,
            "since": s.since,
            "leases": s.leases,
        });
    }
    Ok(v)
}

/// Checks a body against its kind; returns the normalised spec.
fn validate(kind: Kind, body: &Body, keys: &KeyDir) -> Result<Value, ApiError> {
    let kind_name = kind.label();
    if let Some(k) = &body.kind
        && k != kind_name
    {
        return Err(
            FieldError::new("kind", format!("{k:?} sent to the {kind_name} endpoint")).into(),
        );
    }
    if let Some(v) = &body.api_version
        && v != crate::model::API_VERSION
    {
        return Err(FieldError::new("apiVersion", format!("{v:?} is not supported")).into());
    }
    crate::model::validate_name(&body.metadata.name)?;
    match kind {
        Kind::Persona => {
            let spec: PersonaSpec = spec_of(&body.spec)?;
            compile(&spec)?;
            spec.validate_secrets(keys)?;
            serde_json::to_value(spec).map_err(|e| ApiError::internal(e.to_string()))
        }
        Kind::Device => {
            let spec: DeviceSpec = spec_of(&body.spec)?;
            spec.validate()?;
            serde_json::to_value(spec).map_err(|e| ApiError::internal(e.to_string()))
        }
        Kind::Rule => {
            let spec: RuleSpec = spec_of(&body.spec)?;
            spec.validate()?;
            serde_json::to_value(spec).map_err(|e| ApiError::internal(e.to_string()))
        }
        Kind::Application => {
            let spec: ApplicationSpec = spec_of(&body.spec)?;
            spec.validate()?;
            serde_json::to_value(spec).map_err(|e| ApiError::internal(e.to_string()))
        }
    }
}

/// The spec as its type, or the field it got wrong: `spec.addresses[0]`.
fn spec_of<T: serde::de::DeserializeOwned>(spec: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let field = crate::model::field_path(e.path())
            .map_or_else(|| "spec".to_owned(), |p| format!("spec.{p}"));
        ApiError::from(FieldError::new(field, e.into_inner().to_string()))
    })
}

fn event(kind: &str, caller: &Caller, what: &str, result: &str) -> EventBody {
    EventBody {
        kind: kind.into(),
        actor: caller.actor(),
        device: None,
        from: None,
        to: Some(what.into()),
        generation: None,
        result: result.into(),
        duration_us: None,
        detail: Value::Null,
    }
}

async fn list(state: &State, caller: &Caller, kind: Kind) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    let store = state.orchestrator.store();
    let items = store
        .list(kind)?
        .iter()
        .map(|r| view_in(store.as_ref(), r))
        .collect::<Result<Vec<Value>, _>>()?;
    Ok(Json(json!({ "items": items })))
}

async fn get_one(
    state: &State,
    caller: &Caller,
    kind: Kind,
    id: &str,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    let store = state.orchestrator.store();
    let r = store.get(kind, id)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{} {id:?} not found", kind.plural().trim_end_matches('s')),
        )
    })?;
    Ok(Json(view_in(store.as_ref(), &r)?))
}

async fn write(
    state: &State,
    caller: &Caller,
    kind: Kind,
    body: Body,
    expect: Expect,
) -> Result<Record, ApiError> {
    caller.require(Role::Admin)?;
    let spec = validate(kind, &body, state.orchestrator.keys())?;
    let store = state.orchestrator.store();
    let name = body.metadata.name.clone();
    // Two writes must not both pass the checks against other objects (an address, an
    // interface) before either is stored.
    let _guard = match kind {
        Kind::Persona | Kind::Device => Some(state.orchestrator.serialized().await),
        _ => None,
    };
    if kind == Kind::Device {
        let device: DeviceSpec =
            serde_json::from_value(spec.clone()).map_err(|e| ApiError::internal(e.to_string()))?;
        if let Some(p) = &device.persona
            && store.get(Kind::Persona, p)?.is_none()
        {
            return Err(FieldError::new("spec.persona", format!("no Persona named {p:?}")).into());
        }
        if let Some((other, _)) =
            state.orchestrator.devices()?.into_iter().find(|(n, d)| {
                *n != name && d.interface == device.interface && d.host == device.host
            })
        {
            // Interfaces are a host's own: in a fleet, each host has its own names.
            let on = device
                .host
                .as_deref()
                .map(|h| format!(" of host {h:?}"))
                .unwrap_or_default();
            return Err(FieldError::new(
                "spec.interface",
                format!(
                    "Device {other:?} is on {:?}{on}; an interface carries one device",
                    device.interface
                ),
            )
            .into());
        }
        state.orchestrator.admit(&device).await?;
    }
    if kind == Kind::Persona {
        let persona: PersonaSpec =
            serde_json::from_value(spec.clone()).map_err(|e| ApiError::internal(e.to_string()))?;
        // Only those that declare one of its addresses may clash with it.
        let scope = crate::model::AddressScope::of(&persona);
        for other in state.orchestrator.personas_overlapping(&scope)? {
            if other == name {
                continue;
            }
            let Some(theirs) = store.get(Kind::Persona, &other)? else {
                continue;
            };
            let Ok(theirs) = serde_json::from_value::<PersonaSpec>(theirs.spec) else {
                continue;
            };
            if let Some(why) = persona.clashes_with(&theirs) {
                let field = if persona.address_pool.is_empty() {
                    "spec.addresses"
                } else {
                    "spec.addressPool"
                };
                return Err(FieldError::new(
                    field,
                    format!("Persona {other:?}: {why}; an address belongs to one persona"),
                )
                .into());
            }
        }
    }
    let what = format!("{}/{name}", kind.plural());
    let (record, recorded) =
        store.put_recorded(kind, &name, spec, expect, event("apply", caller, &what, ""))?;
    state.orchestrator.recorded(recorded);
    Ok(record)
}

/// After a device is stored: attached when its interface is there, and given its
/// starting persona. When that fails the write is undone, so that a refused device
/// changes nothing; `previous` is the record it replaced.
async fn place_device(
    state: &State,
    caller: &Caller,
    r: &Record,
    previous: Option<Record>,
) -> Result<(), ApiError> {
    let orchestrator = &state.orchestrator;
    let store = orchestrator.store();
    let spec = |r: &Record| {
        serde_json::from_value::<DeviceSpec>(r.spec.clone())
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    let device = spec(r)?;
    let old = previous.as_ref().map(spec).transpose()?;
    let moved = old
        .as_ref()
        .is_some_and(|o| o.interface != device.interface);
    if let Some(o) = old.as_ref().filter(|_| moved) {
        remove_quietly(state, &r.name, o).await;
    }
    let Err(e) = orchestrator.settle_reported(&r.name, &caller.actor()).await else {
        return Ok(());
    };
    match previous {
        None => {
            let what = format!("devices/{}", r.name);
            let body = event("delete", caller, &what, &format!("rolled back: {e}"));
            orchestrator
                .delete_device(&r.name, Expect::Version(r.version), body)
                .await?;
        }
        Some(p) => {
            if moved {
                remove_quietly(state, &r.name, &device).await;
            }
            store.put(Kind::Device, &r.name, p.spec, Expect::Version(r.version))?;
            let _ = orchestrator.settle_reported(&r.name, &caller.actor()).await;
        }
    }
    Err(e.into())
}

async fn remove_quietly(state: &State, name: &str, device: &DeviceSpec) {
    if let Err(e) = state.orchestrator.remove_if_here(device).await {
        tracing::debug!(device = %name, error = %e, "nothing to remove");
    }
}

async fn create(
    state: State,
    caller: Caller,
    kind: Kind,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let r = write(&state, &caller, kind, body, Expect::Absent).await?;
    take_effect(&state, &caller, &r, None).await?;
    Ok((StatusCode::CREATED, Json(view(&r))))
}

/// What an object written (created or replaced `previous`) changes beyond the store: a
/// device placed, the devices on a persona moved to its new version, and the rule
/// engine told.
async fn take_effect(
    state: &State,
    caller: &Caller,
    r: &Record,
    previous: Option<Record>,
) -> Result<(), ApiError> {
    match r.kind {
        Kind::Device => place_device(state, caller, r, previous).await?,
        Kind::Persona => {
            state
                .orchestrator
                .reapply_persona(&r.name, r.version, &caller.actor())
                .await?
        }
        Kind::Rule | Kind::Application => {}
    }
    state.engine.poke(r.kind, &r.name);
    Ok(())
}

async fn put(
    state: State,
    caller: Caller,
    kind: Kind,
    id: String,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    if body.metadata.name != id {
        return Err(FieldError::new(
            "metadata.name",
            format!("{:?} does not match the path's {id:?}", body.metadata.name),
        )
        .into());
    }
    let expect = body.metadata.version.map_or(Expect::Any, Expect::Version);
    let previous = state.orchestrator.store().get(kind, &id)?;
    let r = write(&state, &caller, kind, body, expect).await?;
    take_effect(&state, &caller, &r, previous).await?;
    Ok(Json(view(&r)))
}

#[derive(Debug, Deserialize)]
pub struct DeleteQuery {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    version: Option<u64>,
}

async fn delete(
    state: State,
    caller: Caller,
    kind: Kind,
    id: String,
    q: DeleteQuery,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let store = state.orchestrator.store();
    let expect = q.version.map_or(Expect::Any, Expect::Version);
    let body = event("delete", &caller, &format!("{}/{id}", kind.plural()), "ok");
    match kind {
        Kind::Persona => {
            let users: Vec<String> = store
                .list(Kind::Device)?
                .into_iter()
                .filter(|d| {
                    store
                        .device_state(&d.name)
                        .ok()
                        .flatten()
                        .is_some_and(|s| s.persona == id)
                        || d.spec["persona"] == id.as_str()
                })
                .map(|d| d.name)
                .collect();
            if !users.is_empty() && !q.force {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "Persona {id:?} is used by {}; pass force=true to delete it anyway",
                        users.join(", ")
                    ),
                ));
            }
            let (_, recorded) = store.delete_recorded(kind, &id, expect, body)?;
            state.orchestrator.recorded(recorded);
        }
        Kind::Rule | Kind::Application => {
            let (_, recorded) = store.delete_recorded(kind, &id, expect, body)?;
            state.orchestrator.recorded(recorded);
            state.engine.poke(kind, &id);
        }
        Kind::Device => {
            let r = store.get(kind, &id)?.ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, format!("Device {id:?} not found"))
            })?;
            if let Some(v) = q.version
                && v != r.version
            {
                store.delete(kind, &id, expect)?;
            }
            state.orchestrator.delete_device(&id, expect, body).await?;
            state.engine.poke(kind, &id);
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

macro_rules! handlers {
    ($kind:expr, $list:ident, $create:ident, $get:ident, $put:ident, $delete:ident, $path:literal) => {
        #[utoipa::path(get, path = $path, responses((status = 200, description = "All objects of this kind")), security(("bearer" = [])))]
        pub async fn $list(state: State, caller: Caller) -> Result<Json<Value>, ApiError> {
            list(&state, &caller, $kind).await
        }
        #[utoipa::path(post, path = $path, request_body = Body, responses((status = 201), (status = 409), (status = 422)), security(("bearer" = [])))]
        pub async fn $create(state: State, caller: Caller, Json(body): Json<Body>) -> Result<(StatusCode, Json<Value>), ApiError> {
            create(state, caller, $kind, body).await
        }
        #[utoipa::path(get, path = concat!($path, "/{id}"), params(("id" = String, Path)), responses((status = 200), (status = 404)), security(("bearer" = [])))]
        pub async fn $get(state: State, caller: Caller, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
            get_one(&state, &caller, $kind, &id).await
        }
        #[utoipa::path(put, path = concat!($path, "/{id}"), params(("id" = String, Path)), request_body = Body, responses((status = 200), (status = 409), (status = 422)), security(("bearer" = [])))]
        pub async fn $put(state: State, caller: Caller, Path(id): Path<String>, Json(body): Json<Body>) -> Result<Json<Value>, ApiError> {
            put(state, caller, $kind, id, body).await
        }
        #[utoipa::path(delete, path = concat!($path, "/{id}"), params(("id" = String, Path), ("force" = Option<bool>, Query), ("version" = Option<u64>, Query)), responses((status = 204), (status = 404), (status = 409)), security(("bearer" = [])))]
        pub async fn $delete(state: State, caller: Caller, Path(id): Path<String>, Query(q): Query<DeleteQuery>) -> Result<StatusCode, ApiError> {
            delete(state, caller, $kind, id, q).await
        }
    };
}

handlers!(
    Kind::Persona,
    list_personas,
    create_persona,
    get_persona,
    put_persona,
    delete_persona,
    "/personas"
);
handlers!(
    Kind::Device,
    list_devices,
    create_device,
    get_device,
    put_device,
    delete_device,
    "/devices"
);
handlers!(
    Kind::Rule,
    list_rules,
    create_rule,
    get_rule,
    put_rule,
    delete_rule,
    "/rules"
);
handlers!(
    Kind::Application,
    list_applications,
    create_application,
    get_application,
    put_application,
    delete_application,
    "/applications"
);

/// The device's persona, generation, since when, and its counters.
#[utoipa::path(get, path = "/status/{id}", params(("id" = String, Path)), responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn status(
    state: State,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    let store = state.orchestrator.store();
    let r = store
        .get(Kind::Device, &id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("Device {id:?} not found")))?;
    let device: DeviceSpec =
        serde_json::from_value(r.spec.clone()).map_err(|e| ApiError::internal(e.to_string()))?;
    let device_state = store.device_state(&id)?;
    // A device whose interface is gone (its VM stopped) has no datapath state to show,
    // nor one whose interface was made again and is not attached yet. One of another
    // host of a fleet has none here: what its host recorded is what there is.
    let here = state.orchestrator.runs_here(&device);
    let attached = state
        .orchestrator
        .interface_of(&device.interface)
        .filter(|i| here && crate::datapath::ifindex(&device.interface).ok() == Some(*i));
    let counters = match attached {
        Some(ifindex) => {
            state
                .orchestrator
                .datapath()
                .call(move |dp| Ok((ifindex, dp.active(ifindex)?, dp.counters(ifindex)?)))
                .await
        }
        None => Ok((0, None, Default::default())),
    };
    let (ifindex, active, rows) = match counters {
        Ok((ifindex, active, c)) => (
            ifindex,
            active.map(|a| a.generation),
            c.iter()
                .map(|((dir, reason), v)| {
                    json!({
                        "direction": if *dir == persona_common::DIR_EGRESS { "egress" } else { "ingress" },
                        "reason": reason.label(),
                        "packets": v.packets,
                        "bytes": v.bytes,
                    })
                })
                .collect::<Vec<_>>(),
        ),
        Err(e) => return Err(ApiError::new(StatusCode::BAD_GATEWAY, e.to_string())),
    };
    let swept = state.orchestrator.swept();
    let names = store.persona_names()?;
    let draining: Vec<Value> = swept
        .draining
        .get(&ifindex)
        .into_iter()
        .flatten()
        .map(|(d, n)| {
            json!({
                "address": d.addr,
                "persona": names.get(&d.persona),
                "flows": n,
            })
        })
        .collect();
    let orphaned = match state.orchestrator.fleet() {
        Some(f) => Some(f.orphaned(&device)?),
        None => None,
    };
    Ok(Json(json!({
        "device": id,
        "host": device.host,
        "orphaned": orphaned,
        "interface": device.interface,
        "up": here.then_some(attached.is_some()),
        "error": state.orchestrator.failure(&id),
        "persona": device_state.as_ref().map(|s| &s.persona),
        "generation": if here { active } else { device_state.as_ref().map(|s| s.generation) },
        "since": device_state.as_ref().map(|s| s.since),
        "leases": device_state.as_ref().map(|s| &s.leases),
        "counters": rows,
        "flows": swept.flows.get(&ifindex).copied().unwrap_or(0),
        "draining": draining,
    })))
}
