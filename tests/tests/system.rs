//! System tests: the real binaries, simulated Xen channels (ptys behind UNIX sockets), real MQTT
//! clients (Debian's mosquitto_pub/sub, rumqttc) and both brokers (embedded rumqttd, Debian's mosquitto).

mod support;

mod dom0;
