//! The gRPC front's limits and access rules, with wisp's own generated tonic client
//! (the protocol flows are tested with Triton's `tritonclient.grpc` in tests/python).

use crate::harness::*;
use std::collections::HashMap;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::Code;
use wisp::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use wisp::grpc::pb::model_infer_request::InferInputTensor;
use wisp::grpc::pb::{ModelInferRequest, ServerLiveRequest};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(server: &Server) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .expect("connecting to the gRPC port")
        .max_decoding_message_size(64 << 20)
}

/// `simple` with raw INT32 inputs of `elements` each (16 makes a valid request).
pub(crate) fn simple_infer(elements: usize) -> ModelInferRequest {
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT32".into(),
        shape: vec![1, elements as i64],
        parameters: HashMap::new(),
        contents: None,
    };
    let raw: Vec<u8> = (0..elements as i32).flat_map(|v| v.to_le_bytes()).collect();
    ModelInferRequest {
        model_name: "simple".into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![raw.clone().into(), raw.into()],
        ..Default::default()
    }
}

#[test]
fn raw_inference_over_grpc_matches_the_model() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &[]);
    runtime().block_on(async {
        let mut client = connect(&server).await;
        let response = client
            .model_infer(simple_infer(16))
            .await
            .unwrap()
            .into_inner();
        let sums: Vec<i32> = response.raw_output_contents[0]
            .chunks(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(sums, (0..16).map(|v| 2 * v).collect::<Vec<i32>>());
        assert_eq!(response.outputs[0].name, "OUTPUT0");
        assert_eq!(response.outputs[0].shape, vec![1, 16]);
    });
}

/// `--grpc-restricted-protocol`: the group's RPCs need the metadata key, other groups do not.
#[test]
fn restricted_protocol_needs_the_key() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(
        repo.path(),
        &["--grpc-restricted-protocol", "inference:admin-key=secret"],
    );
    runtime().block_on(async {
        let mut client = connect(&server).await;
        let refused = client.model_infer(simple_infer(16)).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(
            refused.message().contains("admin-key"),
            "{}",
            refused.message()
        );
        let mut request = tonic::Request::new(simple_infer(16));
        request
            .metadata_mut()
            .insert("admin-key", MetadataValue::from_static("secret"));
        client.model_infer(request).await.expect("with the key");
        assert!(
            client
                .server_live(ServerLiveRequest {})
                .await
                .unwrap()
                .into_inner()
                .live
        );
    });
}

/// The attack: a huge message. It is refused by the message size limit, named, and the
/// server keeps serving.
#[test]
fn a_message_over_the_limit_is_refused() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--grpc-max-message-bytes", "4096"]);
    runtime().block_on(async {
        let mut client = connect(&server).await;
        let refused = client.model_infer(simple_infer(4096)).await.unwrap_err();
        assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
        client
            .model_infer(simple_infer(16))
            .await
            .expect("a small request still works");
    });
}

/// A bad tensor is INVALID_ARGUMENT naming the input; an unknown model NOT_FOUND naming it.
#[test]
fn errors_name_what_was_wrong() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &[]);
    runtime().block_on(async {
        let mut client = connect(&server).await;
        let mut short = simple_infer(16);
        short.raw_input_contents[1] = vec![0u8; 7].into();
        let e = client.model_infer(short).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("INPUT1"), "{}", e.message());
        let mut unknown = simple_infer(16);
        unknown.model_name = "nope".into();
        let e = client.model_infer(unknown).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("nope"), "{}", e.message());
    });
}

/// The idle timeout closes idle gRPC connections, but not one with a stream open.
#[test]
fn an_open_stream_is_not_idle() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--http-idle-timeout-secs", "1"]);
    runtime().block_on(async {
        let mut client = connect(&server).await;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let mut responses = client
            .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        sender.send(simple_infer(16)).await.unwrap();
        let first = responses.message().await.unwrap().unwrap();
        assert!(first.error_message.is_empty(), "{}", first.error_message);
        // Longer than the idle timeout, with the stream open and nothing sent.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        sender.send(simple_infer(16)).await.unwrap();
        let second = responses.message().await.unwrap().unwrap();
        assert!(second.error_message.is_empty(), "{}", second.error_message);
    });
}

#[test]
fn grpc_can_be_turned_off() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &["--allow-grpc", "false"]);
    assert_eq!(server.grpc, "off");
}
