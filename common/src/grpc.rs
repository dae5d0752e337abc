//! gRPC plumbing every daemon shares: reflection, health, and serving on a unix socket.

use std::path::Path;

use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::server::Router;

/// Adds gRPC server reflection (both `v1` and the older `v1alpha` that grpcurl 1.8.x asks for)
/// advertising only `services` plus grpc.health.v1, so that `grpcurl ... list` shows what this
/// daemon serves rather than every package of the project.
pub fn with_reflection(
    router: Router,
    services: &[&str],
) -> Result<Router, tonic_reflection::server::Error> {
    let builder = || {
        let b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        services.iter().fold(b, |b, s| b.with_service_name(*s))
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}

/// A health service reporting SERVING for `S` and for the server as a whole ("").
pub async fn health<S: NamedService>()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    service
}

/// Serves `router` on an already bound unix listener until `shutdown` fires.
pub async fn serve_unix(
    router: Router,
    listener: std::os::unix::net::UnixListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the admin socket with the runtime");
            return Ok(());
        }
    };
    router
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
}

/// A tonic channel to a gRPC server on a unix socket (for CLIs and tests).
pub async fn connect_unix(
    path: &Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by the API but unused: the connector below decides where to go.
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower_service_fn(path))
        .await
}

fn tower_service_fn(
    path: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    })
}
