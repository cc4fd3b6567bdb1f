//! containerd's gRPC API, the two calls the sensor makes (`containers.v1.Containers/Get`,
//! `version.v1.Version/Version`), with the messages written out by hand.
//!
//! Why by hand: generating them (containerd-client's build script) needs a system `protoc`, and
//! building the daemon must need nothing but Rust. The messages below are the fields we read of
//! containerd's `api/services/containers/v1/containers.proto` and `version/v1/version.proto`
//! (field numbers and types as there; protobuf skips the fields a message leaves out). The
//! workloads tests talk to a real containerd through this client, so a mismatch fails them.

use std::{collections::HashMap, path::Path};

use hyper_util::rt::TokioIo;
use tonic::{
    client::Grpc,
    codegen::http::uri::PathAndQuery,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
    Code, Request,
};
use tonic_prost::ProstCodec;

/// `containerd.services.containers.v1.GetContainerRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerRequest {
    #[prost(string, tag = "1")]
    pub id: String,
}

/// `containerd.services.containers.v1.GetContainerResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerResponse {
    #[prost(message, optional, tag = "1")]
    pub container: Option<Container>,
}

/// `containerd.services.containers.v1.Container`: the fields the sensor reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Container {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(map = "string, string", tag = "2")]
    pub labels: HashMap<String, String>,
    #[prost(string, tag = "3")]
    pub image: String,
    /// The OCI runtime spec (a `google.protobuf.Any` holding JSON): its annotations name a CRI
    /// container's pod sandbox.
    #[prost(message, optional, tag = "5")]
    pub spec: Option<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `containerd.services.version.v1.VersionResponse` (the request is `google.protobuf.Empty`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub revision: String,
}

/// `google.protobuf.Empty`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

const GET: &str = "/containerd.services.containers.v1.Containers/Get";
const VERSION: &str = "/containerd.services.version.v1.Version/Version";

/// Why a call failed: the connection, or the status containerd answered.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connect {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("namespace {0:?} is not a valid gRPC metadata value")]
    Namespace(String),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

/// A connection to one containerd socket.
pub struct Client {
    grpc: Grpc<Channel>,
}

impl Client {
    /// Connects over the unix socket (the URI is required by the transport and never used).
    pub async fn connect(socket: &Path) -> Result<Self, CallError> {
        let path = socket.to_path_buf();
        let connect_err = |source| CallError::Connect {
            socket: socket.display().to_string(),
            source,
        };
        let channel = Endpoint::from_static("http://[::]")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(connect_err)?;
        Ok(Self {
            grpc: Grpc::new(channel),
        })
    }

    /// `Containers/Get` in one namespace; `Ok(None)` when containerd does not know the id there.
    pub async fn get_container(&mut self, namespace: &str, id: &str) -> Result<Option<Container>, CallError> {
        let mut req = Request::new(GetContainerRequest { id: id.to_string() });
        let ns = MetadataValue::try_from(namespace).map_err(|_| CallError::Namespace(namespace.to_string()))?;
        req.metadata_mut().insert("containerd-namespace", ns);
        match self.unary::<_, GetContainerResponse>(req, GET).await {
            Ok(resp) => Ok(resp.container),
            Err(CallError::Status(s)) if s.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `Version/Version`.
    pub async fn version(&mut self) -> Result<VersionResponse, CallError> {
        self.unary(Request::new(Empty {}), VERSION).await
    }

    async fn unary<Q, A>(&mut self, req: Request<Q>, path: &'static str) -> Result<A, CallError>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| CallError::Status(tonic::Status::unavailable(e.to_string())))?;
        let codec = ProstCodec::<Q, A>::default();
        self.grpc
            .unary(req, PathAndQuery::from_static(path), codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(CallError::Status)
    }
}

/// The annotations of an OCI runtime spec carried in a container's `spec` (JSON); empty when
/// there is none or it is not the JSON expected.
pub fn spec_annotations(spec: Option<&Any>) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Spec {
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    spec.and_then(|a| serde_json::from_slice::<Spec>(&a.value).ok())
        .map(|s| s.annotations)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// Bytes as containerd sends them: fields the sensor does not read (runtime, snapshotter,
    /// timestamps, sandbox) are skipped, the ones it reads decoded.
    #[test]
    fn decodes_a_container_with_fields_it_does_not_model() {
        let mut buf = Vec::new();
        // 1: id
        buf.extend([0x0a, 3]);
        buf.extend(b"abc");
        // 2: labels entry {key "k", value "v"}
        buf.extend([0x12, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);
        // 3: image
        buf.extend([0x1a, 5]);
        buf.extend(b"nginx");
        // 4: runtime {name "io.containerd.runc.v2"}
        let rt = b"io.containerd.runc.v2";
        buf.extend([0x22, (rt.len() + 2) as u8, 0x0a, rt.len() as u8]);
        buf.extend(rt);
        // 5: spec Any {type_url "t", value {"annotations":{"a":"b"}}}
        let json = br#"{"annotations":{"a":"b"}}"#;
        buf.extend([0x2a, (3 + 2 + json.len()) as u8, 0x0a, 1, b't', 0x12, json.len() as u8]);
        buf.extend(json);
        // 6: snapshotter, 11: sandbox
        buf.extend([0x32, 2]);
        buf.extend(b"ov");
        buf.extend([0x5a, 1, b's']);
        let resp = {
            let mut outer = vec![0x0a, buf.len() as u8];
            outer.extend(&buf);
            GetContainerResponse::decode(outer.as_slice()).unwrap()
        };
        let c = resp.container.unwrap();
        assert_eq!(c.id, "abc");
        assert_eq!(c.image, "nginx");
        assert_eq!(c.labels, HashMap::from([("k".to_string(), "v".to_string())]));
        assert_eq!(
            spec_annotations(c.spec.as_ref()),
            HashMap::from([("a".to_string(), "b".to_string())])
        );
    }

    #[test]
    fn a_spec_that_is_not_json_has_no_annotations() {
        let any = Any {
            type_url: "t".into(),
            value: b"\xff not json".to_vec(),
        };
        assert!(spec_annotations(Some(&any)).is_empty());
        assert!(spec_annotations(None).is_empty());
    }
}
