/*
 * mailgw serial protocol v1 -- the device side, for microcontrollers.
 *
 * No malloc, no stdio: the caller owns every buffer. Encoders return the number of
 * bytes written to `out` (a complete frame with CR LF, not NUL-terminated... but a
 * NUL is added when there is room), or 0 when the frame does not fit or a field holds
 * a reserved character. See ../PROTOCOL.md.
 */
#ifndef MAILGW_PROTO_H
#define MAILGW_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define FB_MAX_LINE 512

uint16_t fb_crc16(const uint8_t *data, size_t len);

size_t fb_encode_hello(char *out, size_t cap, uint32_t seq, const char *device_id,
                       const char *fw_version, const char *boot_id);
size_t fb_encode_alert(char *out, size_t cap, uint32_t seq, const char *sensor,
                       const char *severity, const char *message);
size_t fb_encode_ping(char *out, size_t cap, uint32_t seq);

typedef enum { FB_INVALID = 0, FB_ACK, FB_NAK, FB_PONG } fb_kind;

typedef struct {
    fb_kind kind;
    int has_seq;      /* 0 for "NAK,-,..." */
    uint32_t seq;
    char reason[16];  /* NAK only */
} fb_reply;

/* Decode one received line (without or with its CR LF). Returns 1 and fills `out` for a
 * valid ACK, NAK or PONG whose CRC checks; 0 otherwise (ignore the line). */
int fb_decode_reply(const char *line, size_t len, fb_reply *out);

#endif
