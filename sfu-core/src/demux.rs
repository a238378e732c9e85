//! Recognising datagrams on the shared media port without any state: which
//! are STUN binding requests, and which server ufrag they name.

/// STUN magic cookie (RFC 5389).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const ATTR_USERNAME: u16 = 0x0006;

/// True when the datagram looks like a STUN message (RFC 7983 demux range,
/// magic cookie present).
pub fn is_stun(data: &[u8]) -> bool {
    data.len() >= 20 && data[0] < 4 && data[4..8] == MAGIC_COOKIE
}

/// For a STUN binding request, the server-side ICE ufrag: the part of
/// USERNAME (`<server ufrag>:<client ufrag>`) before the colon.
/// Returns `None` for anything else, including truncated or malformed
/// messages. Integrity is checked later by the peer connection itself.
pub fn binding_request_ufrag(data: &[u8]) -> Option<&str> {
    let username = binding_request_username(data)??;
    let username = std::str::from_utf8(username).ok()?;
    let (server, _client) = username.split_once(':')?;
    (!server.is_empty()).then_some(server)
}

/// For a well-formed STUN binding request, its USERNAME value if it has
/// one (`Some(None)`: a bare request). `None` for anything else.
fn binding_request_username(data: &[u8]) -> Option<Option<&[u8]>> {
    if !is_stun(data) || u16::from_be_bytes([data[0], data[1]]) != BINDING_REQUEST {
        return None;
    }
    let body_len = u16::from_be_bytes([data[2], data[3]]) as usize;
    let body = data.get(20..20 + body_len)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[at], body[at + 1]]);
        let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + len)?;
        if typ == ATTR_USERNAME {
            return Some(Some(value));
        }
        // Attributes are padded to four bytes.
        at += 4 + len.div_ceil(4) * 4;
    }
    Some(None)
}

const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// For a bare STUN binding request (no USERNAME: a client asking a STUN
/// server for its public address, not an ICE check), the success response
/// telling `source` the address it was seen from (XOR-MAPPED-ADDRESS).
/// `None` for anything else.
pub fn reflexive_response(data: &[u8], source: std::net::SocketAddr) -> Option<Vec<u8>> {
    if binding_request_username(data)?.is_some() {
        return None;
    }
    let transaction = &data[8..20];
    let port = source.port() ^ 0x2112;
    let mut value = vec![0u8];
    match source.ip() {
        std::net::IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            for (b, m) in ip.octets().iter().zip(MAGIC_COOKIE) {
                value.push(b ^ m);
            }
        }
        std::net::IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mask: Vec<u8> = MAGIC_COOKIE.iter().chain(transaction).copied().collect();
            for (b, m) in ip.octets().iter().zip(mask) {
                value.push(b ^ m);
            }
        }
    }
    let mut out = Vec::with_capacity(20 + 4 + value.len());
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(transaction);
    out.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(&value);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        attr.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attr.extend_from_slice(username.as_bytes());
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        // A PRIORITY attribute after USERNAME, as browsers send.
        let mut msg = Vec::new();
        msg.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
        msg.extend_from_slice(&((attr.len() + 8) as u16).to_be_bytes());
        msg.extend_from_slice(&MAGIC_COOKIE);
        msg.extend_from_slice(&[7u8; 12]);
        msg.extend_from_slice(&attr);
        msg.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        msg
    }

    #[test]
    fn finds_server_ufrag() {
        let msg = binding_request("srvUfrag123:cli");
        assert_eq!(binding_request_ufrag(&msg), Some("srvUfrag123"));
        let msg = binding_request("abcde:f");
        assert_eq!(binding_request_ufrag(&msg), Some("abcde"));
    }

    #[test]
    fn rejects_non_stun_and_malformed() {
        assert_eq!(binding_request_ufrag(&[]), None);
        assert_eq!(binding_request_ufrag(&[0x80; 40]), None); // RTP
        let mut msg = binding_request("a:b");
        msg[0] = 0x01; // 0x0101: binding success response
        assert_eq!(binding_request_ufrag(&msg), None);
        let msg = binding_request("nocolon");
        assert_eq!(binding_request_ufrag(&msg), None);
        let msg = binding_request(":client");
        assert_eq!(binding_request_ufrag(&msg), None);
        let mut msg = binding_request("srv:cli");
        msg.truncate(26); // length field now points past the end
        assert_eq!(binding_request_ufrag(&msg), None);
        let mut msg = binding_request("srv:cli");
        msg[22..24].copy_from_slice(&0xFFFFu16.to_be_bytes()); // attribute longer than body
        assert_eq!(binding_request_ufrag(&msg), None);
    }

    #[test]
    fn bare_binding_requests_learn_their_reflexive_address() {
        let mut request = Vec::new();
        request.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&MAGIC_COOKIE);
        request.extend_from_slice(b"txid-twelve!");
        let source: std::net::SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let response = reflexive_response(&request, source).expect("answered");
        assert_eq!(&response[..2], &BINDING_SUCCESS.to_be_bytes());
        assert_eq!(&response[8..20], b"txid-twelve!");
        // XOR-MAPPED-ADDRESS, IPv4: port and address XORed with the cookie.
        assert_eq!(&response[20..24], &[0x00, 0x20, 0x00, 0x08]);
        let port = u16::from_be_bytes([response[26], response[27]]) ^ 0x2112;
        let ip: Vec<u8> = response[28..32]
            .iter()
            .zip(MAGIC_COOKIE)
            .map(|(b, m)| b ^ m)
            .collect();
        assert_eq!(port, 40000);
        assert_eq!(ip, vec![203, 0, 113, 7]);
        // ICE checks (with USERNAME) and other messages are not answered.
        assert!(reflexive_response(&binding_request("srv:cli"), source).is_none());
        assert!(reflexive_response(b"not stun at all, really not", source).is_none());
        let mut truncated = request.clone();
        truncated[3] = 40;
        assert!(reflexive_response(&truncated, source).is_none());
    }
}
