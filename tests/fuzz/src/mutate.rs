//! Mutations of saved device state, as a damaged or forged snapshot would
//! carry it: any field of the transport or of a queue set to any value,
//! and the device's own state edited through its JSON form (the form it
//! has in a snapshot file).

use base64::Engine;
use podflare_hostd::devices::virtio::mmio::{MmioState, SavedQueue};
use podflare_hostd::devices::virtio::DeviceState;
use serde_json::Value;

use crate::Reader;

/// Applies `count: u8` mutations read from `r` to `state`, each
/// `selector: u8, value: u64` (plus a blob for some device edits).
pub fn mmio_state(state: &mut MmioState, r: &mut Reader) {
    for _ in 0..r.u8() % 8 {
        let sel = r.u8();
        let v = r.u64();
        if sel < 16 {
            transport_field(state, sel, v);
        } else if sel < 160 {
            let nq = state.queues.len().max(1);
            let q = usize::from(sel - 16) / 9 % nq;
            if let Some(sq) = state.queues.get_mut(q) {
                queue_field(sq, (sel - 16) % 9, v);
            }
        } else {
            device_field(&mut state.device, sel, v, r);
        }
    }
}

fn transport_field(s: &mut MmioState, sel: u8, v: u64) {
    match sel {
        0 => s.status = v as u32,
        1 => s.activated = v & 1 == 1,
        2 => s.acked_features = v,
        3 => s.queue_select = v as u32,
        4 => s.features_select = v as u32,
        5 => s.acked_features_select = v as u32,
        6 => s.interrupt_status = v as u32,
        7 => s.config_generation = v as u32,
        8 => s.device_type = v as u32,
        9 => {
            s.queues.pop();
        }
        10 => s.queues.push(SavedQueue::default()),
        // A plausible "activated" flip: the bits a live device has.
        _ => {
            s.status |= 0xf;
            s.activated = true;
        }
    }
}

fn queue_field(q: &mut SavedQueue, k: u8, v: u64) {
    match k {
        0 => q.max_size = v as u16,
        1 => q.next_avail = v as u16,
        2 => q.next_used = v as u16,
        3 => q.event_idx_enabled = v & 1 == 1,
        4 => q.size = v as u16,
        5 => q.ready = v & 1 == 1,
        6 => q.desc_table = v,
        7 => q.avail_ring = v,
        _ => q.used_ring = v,
    }
}

fn b64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Edits the device's own state through its JSON; an edit that no longer
/// deserializes is dropped (the snapshot decoder would refuse it first).
fn device_field(dev: &mut DeviceState, sel: u8, v: u64, r: &mut Reader) {
    let Ok(mut json) = serde_json::to_value(&*dev) else { return };
    let blob = r.blob();
    let port = (v % 3) as usize;
    match &mut json {
        Value::Object(o) if o.contains_key("Block") => {
            o["Block"]["capacity"] = Value::from(v);
        }
        Value::Object(o) => {
            let Some(c) = o.get_mut("Console") else { return };
            match sel % 8 {
                0 => c["device_ready"] = Value::Bool(v & 1 == 1),
                1 => set_port(c, port, "ready", Value::Bool(v & 2 == 2)),
                2 => set_port(c, port, "guest_open", Value::Bool(v & 2 == 2)),
                3 => set_port(c, port, "pending", b64(blob)),
                4 => push(c, "ctrl_pending", b64(blob)),
                5 => push(c, "ctrl_pending", Value::String(String::from_utf8_lossy(blob).into_owned())),
                6 => push(c, "port_names", Value::String(String::from_utf8_lossy(blob).into_owned())),
                _ => push(c, "ports", serde_json::json!({"ready": true, "guest_open": true, "pending": ""})),
            }
        }
        _ => return,
    }
    if let Ok(d) = serde_json::from_value(json) {
        *dev = d;
    }
}

fn set_port(c: &mut Value, port: usize, field: &str, v: Value) {
    if let Some(p) = c["ports"].get_mut(port) {
        p[field] = v;
    }
}

fn push(c: &mut Value, field: &str, v: Value) {
    if let Some(a) = c[field].as_array_mut() {
        a.push(v);
    }
}
