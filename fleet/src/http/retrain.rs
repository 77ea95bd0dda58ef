//! The retraining routes: `GET /api/fleet-drift` ([`FleetDriftView`]),
//! `GET /api/retrain` ([`Overview`]), `GET /api/retrain/request?devices=`
//! (a [`Request`] for the drifting devices or those named, `samples_csv:
//! "samples.csv"`), and `GET /api/retrain/export?devices=` (their samples as
//! CSV, the row count in [`ROWS_HEADER`]). No drifting device (and none
//! named) answers 404.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_host::now_ms;
use serde::Deserialize;

use super::{ApiError, blocking};
use crate::retrain::{FleetDriftView, Overview, ROWS_HEADER, Request, Retrainer};

/// Query of the export routes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExportQuery {
    /// Comma-separated devices (default: the drifting ones).
    #[serde(default)]
    pub devices: Option<String>,
}

/// The routes over `r`; merged into the console's router.
pub fn routes(r: Arc<Retrainer>) -> axum::Router {
    axum::Router::new()
        .route("/api/fleet-drift", get(fleet_drift))
        .route("/api/retrain", get(overview))
        .route("/api/retrain/request", get(request))
        .route("/api/retrain/export", get(export))
        .with_state(r)
}

async fn fleet_drift(
    State(r): State<Arc<Retrainer>>,
) -> Result<axum::Json<FleetDriftView>, ApiError> {
    let view = blocking(move || Ok(r.fleet_drift_view(now_ms()))).await?;
    Ok(axum::Json(view))
}

async fn overview(State(r): State<Arc<Retrainer>>) -> Result<axum::Json<Overview>, ApiError> {
    let overview = blocking(move || Ok(r.overview()?)).await?;
    Ok(axum::Json(overview))
}

async fn request(
    State(r): State<Arc<Retrainer>>,
    Query(q): Query<ExportQuery>,
) -> Result<axum::Json<Request>, ApiError> {
    let request = blocking(move || {
        let now = now_ms();
        let devices = r.export_devices(q.devices.as_deref(), now)?;
        Ok(r.request(Vec::new(), &devices, None, now, "samples.csv").0)
    })
    .await?;
    Ok(axum::Json(request))
}

async fn export(
    State(r): State<Arc<Retrainer>>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let (rows, csv) = blocking(move || {
        let now = now_ms();
        let devices = r.export_devices(q.devices.as_deref(), now)?;
        let (request, csv) = r.request(Vec::new(), &devices, None, now, "samples.csv");
        Ok((request.rows, csv))
    })
    .await?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::HeaderName::from_static(ROWS_HEADER),
                rows.to_string(),
            ),
        ],
        csv,
    )
        .into_response())
}
