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

/* Receipts (PROTOCOL.md, Receipts). ALERTR is an ALERT that asks for a RCPT once the
 * alert's mail is settled; `receipt` is the device's id for it (1-128 characters of
 * A-Z a-z 0-9 . _ : -). Answer each RCPT with RACK (fb_encode_rack), or the gateway
 * sends it again. */
#define FB_MAX_RECEIPT_ID 128
#define FB_MAX_RCPT_REASON 95 /* the reason is cut to this many bytes when decoded */

size_t fb_encode_alert_r(char *out, size_t cap, uint32_t seq, const char *receipt,
                         const char *sensor, const char *severity, const char *message);
size_t fb_encode_rack(char *out, size_t cap, const char *receipt);

typedef struct {
    char receipt[FB_MAX_RECEIPT_ID + 1];
    int sent;                              /* 1: SENT (the smarthost accepted), 0: DEAD */
    char alert_id[65];                     /* the gateway's alert id */
    char reason[FB_MAX_RCPT_REASON + 1];   /* DEAD: the server's reply, cut */
} fb_receipt;

/* Decode one received line. Returns 1 and fills `out` for a valid RCPT whose CRC
 * checks; 0 otherwise (not a RCPT: try fb_decode_reply, or ignore it). */
int fb_decode_receipt(const char *line, size_t len, fb_receipt *out);

#endif
