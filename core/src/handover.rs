//! Unacknowledged batches handed from a VM that goes away to the VM that replaces it.
//!
//! Envoy builds new VMs when the plugin configuration changes; proxy-wasm shared data outlives
//! them. A VM going away appends the batches the collector has not acknowledged to one
//! shared-data value; the next VM to tick takes the whole value (compare-and-swap to empty)
//! and sends the batches under their original ids, so a batch that the old VM's last send
//! delivered after all is counted once by the collector.
//!
//! The value is a sequence of frames, each
//! `[u16 id length][id][u32 record count][u32 body length][body]`, little-endian. It is only
//! ever written by this code, but a damaged value must not panic a VM: decoding stops at the
//! first frame that does not fit and reports how many bytes it could not read.

use crate::shipper::HeldBatch;

/// Append `batches` to an encoded list.
pub fn append(list: &mut Vec<u8>, batches: impl IntoIterator<Item = HeldBatch>) {
    for batch in batches {
        // Ids are at most 256 bytes (the wire format's limit) and bodies at most 4 MiB, far
        // inside the frame's fields; anything larger is not a batch the collector would take.
        let (Ok(id_len), Ok(records), Ok(body_len)) = (
            u16::try_from(batch.batch_id.len()),
            u32::try_from(batch.records),
            u32::try_from(batch.body.len()),
        ) else {
            continue;
        };
        list.extend_from_slice(&id_len.to_le_bytes());
        list.extend_from_slice(batch.batch_id.as_bytes());
        list.extend_from_slice(&records.to_le_bytes());
        list.extend_from_slice(&body_len.to_le_bytes());
        list.extend_from_slice(&batch.body);
    }
}

/// The batches of an encoded list, and the number of trailing bytes that were not a frame.
pub fn decode(mut bytes: &[u8]) -> (Vec<HeldBatch>, usize) {
    let mut batches = Vec::new();
    while !bytes.is_empty() {
        match frame(bytes) {
            Some((batch, rest)) => {
                batches.push(batch);
                bytes = rest;
            }
            None => return (batches, bytes.len()),
        }
    }
    (batches, 0)
}

/// The list without the batch `batch_id` (it was acknowledged after being handed over).
pub fn without(bytes: &[u8], batch_id: &str) -> Vec<u8> {
    let (batches, _) = decode(bytes);
    let mut list = Vec::with_capacity(bytes.len());
    append(
        &mut list,
        batches.into_iter().filter(|b| b.batch_id != batch_id),
    );
    list
}

fn frame(bytes: &[u8]) -> Option<(HeldBatch, &[u8])> {
    let (id_len, rest) = take(bytes, 2)?;
    let id_len = usize::from(u16::from_le_bytes(id_len.try_into().ok()?));
    let (id, rest) = take(rest, id_len)?;
    let (records, rest) = take(rest, 4)?;
    let (body_len, rest) = take(rest, 4)?;
    let body_len = usize::try_from(u32::from_le_bytes(body_len.try_into().ok()?)).ok()?;
    let (body, rest) = take(rest, body_len)?;
    let batch = HeldBatch {
        batch_id: String::from_utf8(id.to_vec()).ok()?,
        records: usize::try_from(u32::from_le_bytes(records.try_into().ok()?)).ok()?,
        body: body.to_vec(),
    };
    Some((batch, rest))
}

fn take(bytes: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= n).then(|| bytes.split_at(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: &str, records: usize, body: &str) -> HeldBatch {
        HeldBatch {
            batch_id: id.into(),
            records,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn batches_round_trip_in_order_and_lists_concatenate() {
        let mut list = Vec::new();
        append(
            &mut list,
            [batch("a/1/1", 4, "{\"x\":1}"), batch("a/1/2", 1, "")],
        );
        append(&mut list, [batch("b/2/7", 9, "{}")]);
        let (batches, rest) = decode(&list);
        assert_eq!(rest, 0);
        assert_eq!(
            batches,
            vec![
                batch("a/1/1", 4, "{\"x\":1}"),
                batch("a/1/2", 1, ""),
                batch("b/2/7", 9, "{}")
            ]
        );
        assert_eq!(decode(&[]).0, vec![]);
    }

    #[test]
    fn an_acknowledged_batch_is_removed_and_the_others_kept() {
        let mut list = Vec::new();
        append(&mut list, [batch("a", 1, "1"), batch("b", 2, "2")]);
        let list = without(&list, "a");
        assert_eq!(decode(&list).0, vec![batch("b", 2, "2")]);
        assert_eq!(without(&list, "zzz"), list);
    }

    #[test]
    fn a_damaged_list_yields_the_whole_frames_and_never_panics() {
        let mut list = Vec::new();
        append(
            &mut list,
            [batch("a", 1, "body-a"), batch("b", 2, "body-b")],
        );
        // A frame of "a": 2 + 1 + 4 + 4 + 6 bytes.
        let first_len = 17;
        for cut in 0..list.len() {
            let (batches, rest) = decode(list.get(..cut).unwrap());
            let whole = usize::from(cut >= first_len);
            assert_eq!(batches.len(), whole, "cut at {cut}");
            assert_eq!(rest, cut - whole * first_len, "cut at {cut}");
        }
        let (batches, rest) = decode(&[0xff, 0xff, 1, 2, 3]);
        assert!(batches.is_empty());
        assert_eq!(rest, 5);
    }
}
