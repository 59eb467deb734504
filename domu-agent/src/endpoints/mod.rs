//! The guest's applications reach the messaging through the agent's local endpoints: any MQTT
//! client (`mqtt`, each connection a `mqtt_session`, pure), the MVP's JSON lines (`legacy`), and
//! the requests of `domu-agent call` (`call`, printed by `call_output`; a large `create_file`
//! uploaded in chunks by `call_upload`). What they share: the
//! admission of their connections, the accept loop's backoff, their sockets (`admission`).

pub mod admission;
pub mod call;
pub use topics::call_output;
pub mod call_upload;
pub mod legacy;
pub mod mqtt;
pub mod mqtt_session;
