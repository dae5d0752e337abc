//! The `proxyd.v1.Admin` gRPC service the master serves on its unix socket.

use proto::proxyd::v1 as api;
use proto::proxyd::v1::admin_server::{Admin, AdminServer};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::master::{CertificatesError, Handle, ReloadError, SetServerError};

#[derive(Debug)]
pub struct AdminService {
    master: Handle,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _req: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusReply>, Status> {
        self.master
            .status()
            .await
            .map(Response::new)
            .ok_or_else(|| Status::unavailable("the master is stopping"))
    }

    async fn reload(
        &self,
        _req: Request<api::ReloadRequest>,
    ) -> Result<Response<api::ReloadReply>, Status> {
        match self.master.reload().await {
            Ok(result) => Ok(Response::new(api::ReloadReply {
                result: Some(result),
            })),
            Err(e @ ReloadError::Config(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ ReloadError::Worker(_)) => Err(Status::internal(e.to_string())),
            Err(e @ ReloadError::Stopping) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn reload_certificates(
        &self,
        _req: Request<api::ReloadCertificatesRequest>,
    ) -> Result<Response<api::ReloadCertificatesReply>, Status> {
        match self.master.reload_certificates().await {
            Ok(reply) => Ok(Response::new(reply)),
            Err(e @ CertificatesError::Refused(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ CertificatesError::Stopping) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn show_servers(
        &self,
        req: Request<api::ShowServersRequest>,
    ) -> Result<Response<api::ShowServersReply>, Status> {
        let want = req.into_inner().backend;
        let (generation, servers, ..) = self
            .master
            .servers()
            .await
            .ok_or_else(|| Status::unavailable("the master is stopping"))?;
        if !want.is_empty() && !servers.iter().any(|s| s.backend == want) {
            return Err(Status::not_found(format!("no backend '{want}'")));
        }
        Ok(Response::new(api::ShowServersReply {
            servers: servers
                .into_iter()
                .filter(|s| want.is_empty() || s.backend == want)
                .collect(),
            generation,
        }))
    }

    async fn set_server(
        &self,
        req: Request<api::SetServerRequest>,
    ) -> Result<Response<api::SetServerReply>, Status> {
        match self.master.set_server(req.into_inner()).await {
            Ok(server) => Ok(Response::new(api::SetServerReply {
                server: Some(server),
            })),
            Err(e @ SetServerError::NotFound { .. }) => Err(Status::not_found(e.to_string())),
            Err(e @ SetServerError::Invalid(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ SetServerError::Stopping) => Err(Status::unavailable(e.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("admin server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves Admin, reflection and health on `listener` until `shutdown`.
pub async fn serve(
    master: Handle,
    listener: std::os::unix::net::UnixListener,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let router = tonic::transport::Server::builder()
        .add_service(common::grpc::health::<AdminServer<AdminService>>().await)
        .add_service(AdminServer::new(AdminService { master }));
    let router = common::grpc::with_reflection(router, &[api::admin_server::SERVICE_NAME])?;
    common::grpc::serve_unix(router, listener, shutdown).await?;
    Ok(())
}
