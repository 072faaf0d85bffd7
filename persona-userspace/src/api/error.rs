use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{auth::AuthError, model::FieldError, orchestrator::ShiftError, store::StoreError};

/// Every error is `{"error": "..."}` (plus `"field"` for bad input) with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: e.to_string(),
            field: Some(e.field),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Exists { .. } | StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Backend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Forbidden(_) => StatusCode::FORBIDDEN,
        };
        Self::new(status, e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Invalid | AuthError::Revoked => {
                Self::new(StatusCode::UNAUTHORIZED, e.to_string())
            }
            AuthError::Forbidden { .. } => Self::new(StatusCode::FORBIDDEN, e.to_string()),
            AuthError::Store(s) => s.into(),
        }
    }
}

impl From<ShiftError> for ApiError {
    fn from(e: ShiftError) -> Self {
        match e {
            ShiftError::Store(s) => s.into(),
            ShiftError::Invalid(f) => f.into(),
            ShiftError::Corrupt { .. } => Self::internal(e.to_string()),
            ShiftError::Held { .. } | ShiftError::Busy(_) => {
                Self::new(StatusCode::CONFLICT, e.to_string())
            }
            ShiftError::RolledBack { .. } | ShiftError::Failed(_) => {
                Self::new(StatusCode::BAD_GATEWAY, e.to_string())
            }
            ShiftError::Remote { status, message } => Self::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                message,
            ),
        }
    }
}
