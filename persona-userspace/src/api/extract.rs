//! What handlers take from a request, with every rejection in the API's JSON error shape:
//! a body or a query that does not fit names the field, never a framework's plain text.
use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{StatusCode, header::CONTENT_TYPE, request::Parts},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};

use super::ApiError;
use crate::model::field_path;

/// A JSON body in, or a JSON document out.
pub struct Json<T>(pub T);

/// `application/json`, or any `application/...+json`.
fn is_json(req: &Request) -> bool {
    let Some(ct) = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence
            .strip_prefix("application/")
            .is_some_and(|s| s.ends_with("+json"))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(&req) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let not_json = |e: serde_json::Error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        };
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = field_path(e.path());
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return not_json(inner);
            }
            let message = match &field {
                Some(f) => format!("{f}: {inner}"),
                None => inner.to_string(),
            };
            ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message,
                field,
            }
        })?;
        de.end().map_err(not_json)?;
        Ok(Json(value))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// The query string.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let field = field_path(e.path());
                let message = match &field {
                    Some(f) => format!("query {f}: {}", e.inner()),
                    None => format!("query: {}", e.inner()),
                };
                ApiError {
                    status: StatusCode::BAD_REQUEST,
                    message,
                    field,
                }
            })
    }
}

/// Values from the path.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::new(e.status(), e.body_text()))
    }
}
