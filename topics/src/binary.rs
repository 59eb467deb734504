//! Binary fields: standard Base64 with padding, with the size limit checked before decoding.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Why a Base64 field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base64Error {
    #[error("data decodes to {size} bytes (at most {max})")]
    TooLarge { size: usize, max: usize },
    #[error("data is not standard padded Base64: {0}")]
    Invalid(String),
}

/// Encodes bytes as standard padded Base64.
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Exact decoded size of a well-formed padded Base64 string, computed without decoding.
pub fn decoded_len(encoded: &str) -> Result<usize, Base64Error> {
    let len = encoded.len();
    if len % 4 != 0 {
        return Err(Base64Error::Invalid(format!(
            "length {len} is not a multiple of 4"
        )));
    }
    let padding = encoded.bytes().rev().take(2).filter(|b| *b == b'=').count();
    Ok(len / 4 * 3 - padding)
}

/// Decodes standard padded Base64, refusing before any allocation if the result would exceed `max`.
pub fn decode_limited(encoded: &str, max: usize) -> Result<Vec<u8>, Base64Error> {
    let size = decoded_len(encoded)?;
    if size > max {
        return Err(Base64Error::TooLarge { size, max });
    }
    STANDARD
        .decode(encoded)
        .map_err(|e| Base64Error::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_sizes() {
        for data in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            &[0u8, 255, 128, 7][..],
        ] {
            let e = encode(data);
            assert_eq!(decoded_len(&e), Ok(data.len()));
            assert_eq!(decode_limited(&e, data.len()).unwrap(), data);
        }
        assert_eq!(encode(b"contenu"), "Y29udGVudQ==");
    }

    #[test]
    fn refusals() {
        assert_eq!(
            decode_limited("Y29udGVudQ==", 6),
            Err(Base64Error::TooLarge { size: 7, max: 6 })
        );
        // A huge declared payload is refused from its length alone.
        let huge = "A".repeat(4 * 1024 * 1024);
        assert!(matches!(
            decode_limited(&huge, 1024),
            Err(Base64Error::TooLarge { .. })
        ));
        for bad in ["abc", "Y29udGVudQ", "Y29u dGVu", "Y29udGVudQ=!", "-_-_"] {
            assert!(
                matches!(decode_limited(bad, 100), Err(Base64Error::Invalid(_))),
                "{bad}"
            );
        }
    }
}
