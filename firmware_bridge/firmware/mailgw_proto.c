/* mailgw serial protocol v1 -- device side. See mailgw_proto.h and ../PROTOCOL.md. */
#include "mailgw_proto.h"

uint16_t fb_crc16(const uint8_t *data, size_t len)
{
    /* CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor. */
    uint16_t crc = 0xFFFF;
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)data[i] << 8;
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

typedef struct { char *buf; size_t cap; size_t len; int bad; } writer;

static void put_char(writer *w, char c)
{
    if (w->len + 1 > w->cap) { w->bad = 1; return; }
    w->buf[w->len++] = c;
}

static void put_str(writer *w, const char *s, int last)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        /* Reserved: line breaks and '$' anywhere; ',' and '*' except in the last field. */
        if (c < 0x20 || c == 0x7f || c == '$' || (!last && (c == ',' || c == '*'))) {
            w->bad = 1;
            return;
        }
        put_char(w, (char)c);
    }
}

static void put_lit(writer *w, const char *s)
{
    for (; *s; s++) put_char(w, *s);
}

static void put_u32(writer *w, uint32_t v)
{
    char digits[10];
    int n = 0;
    do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) put_char(w, digits[--n]);
}

/* Wrap the body already in w->buf[1..] as "$body*CRC\r\n". */
static size_t finish(writer *w)
{
    static const char hex[] = "0123456789ABCDEF";
    uint16_t crc;
    if (w->bad) return 0;
    crc = fb_crc16((const uint8_t *)w->buf + 1, w->len - 1);
    put_char(w, '*');
    put_char(w, hex[(crc >> 12) & 0xF]);
    put_char(w, hex[(crc >> 8) & 0xF]);
    put_char(w, hex[(crc >> 4) & 0xF]);
    put_char(w, hex[crc & 0xF]);
    put_char(w, '\r');
    put_char(w, '\n');
    if (w->bad || w->len > FB_MAX_LINE) return 0;
    if (w->len < w->cap) w->buf[w->len] = '\0';
    return w->len;
}

size_t fb_encode_hello(char *out, size_t cap, uint32_t seq, const char *device_id,
                       const char *fw_version, const char *boot_id)
{
    writer w = {out, cap, 0, 0};
    put_lit(&w, "$HELLO,");
    put_u32(&w, seq);
    put_char(&w, ',');
    put_str(&w, device_id, 0);
    put_char(&w, ',');
    put_str(&w, fw_version, 0);
    put_char(&w, ',');
    put_str(&w, boot_id, 0);
    return finish(&w);
}

size_t fb_encode_alert(char *out, size_t cap, uint32_t seq, const char *sensor,
                       const char *severity, const char *message)
{
    writer w = {out, cap, 0, 0};
    put_lit(&w, "$ALERT,");
    put_u32(&w, seq);
    put_char(&w, ',');
    put_str(&w, sensor, 0);
    put_char(&w, ',');
    put_str(&w, severity, 0);
    put_char(&w, ',');
    put_str(&w, message, 1);
    return finish(&w);
}

size_t fb_encode_ping(char *out, size_t cap, uint32_t seq)
{
    writer w = {out, cap, 0, 0};
    put_lit(&w, "$PING,");
    put_u32(&w, seq);
    return finish(&w);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int parse_u32(const char *s, size_t n, uint32_t *out)
{
    uint64_t v = 0;
    if (n == 0 || n > 10) return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (v > 0xFFFFFFFFu) return 0;
    *out = (uint32_t)v;
    return 1;
}

static int starts(const char *s, size_t n, const char *prefix, size_t *used)
{
    size_t i = 0;
    for (; prefix[i]; i++)
        if (i >= n || s[i] != prefix[i]) return 0;
    *used = i;
    return 1;
}

int fb_decode_reply(const char *line, size_t len, fb_reply *out)
{
    size_t start = 0, star, body_len, used, i;
    const char *body;
    uint16_t crc = 0;

    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) len--;
    while (start < len && line[start] != '$') start++;
    if (start >= len) return 0;
    body = line + start + 1;
    body_len = len - start - 1;
    if (body_len < 5 || body[body_len - 5] != '*') return 0;
    star = body_len - 5;
    for (i = 0; i < 4; i++) {
        int h = hexval(body[star + 1 + i]);
        if (h < 0) return 0;
        crc = (uint16_t)((crc << 4) | (uint16_t)h);
    }
    if (crc != fb_crc16((const uint8_t *)body, star)) return 0;

    out->has_seq = 1;
    out->reason[0] = '\0';
    if (starts(body, star, "ACK,", &used)) {
        out->kind = FB_ACK;
        return parse_u32(body + used, star - used, &out->seq);
    }
    if (starts(body, star, "PONG,", &used)) {
        out->kind = FB_PONG;
        return parse_u32(body + used, star - used, &out->seq);
    }
    if (starts(body, star, "NAK,", &used)) {
        size_t comma = used;
        while (comma < star && body[comma] != ',') comma++;
        if (comma >= star) return 0;
        out->kind = FB_NAK;
        if (comma - used == 1 && body[used] == '-') {
            out->has_seq = 0;
            out->seq = 0;
        } else if (!parse_u32(body + used, comma - used, &out->seq)) {
            return 0;
        }
        if (star - comma - 1 >= sizeof out->reason) return 0;
        for (i = 0; i < star - comma - 1; i++) out->reason[i] = body[comma + 1 + i];
        out->reason[i] = '\0';
        return 1;
    }
    return 0;
}

static int id_char(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == ':' || c == '-';
}

static void put_id(writer *w, const char *s, size_t max)
{
    size_t n = 0;
    for (; s[n]; n++)
        if (!id_char(s[n])) { w->bad = 1; return; }
    if (n == 0 || n > max) { w->bad = 1; return; }
    put_lit(w, s);
}

size_t fb_encode_alert_r(char *out, size_t cap, uint32_t seq, const char *receipt,
                         const char *sensor, const char *severity, const char *message)
{
    writer w = {out, cap, 0, 0};
    put_lit(&w, "$ALERTR,");
    put_u32(&w, seq);
    put_char(&w, ',');
    put_id(&w, receipt, FB_MAX_RECEIPT_ID);
    put_char(&w, ',');
    put_str(&w, sensor, 0);
    put_char(&w, ',');
    put_str(&w, severity, 0);
    put_char(&w, ',');
    put_str(&w, message, 1);
    return finish(&w);
}

size_t fb_encode_rack(char *out, size_t cap, const char *receipt)
{
    writer w = {out, cap, 0, 0};
    put_lit(&w, "$RACK,");
    put_id(&w, receipt, FB_MAX_RECEIPT_ID);
    return finish(&w);
}

/* Copy body[from, to) into dst (capacity cap, NUL included); 0 if it does not fit and
 * `cut` is not set. */
static int copy_field(char *dst, size_t cap, const char *body, size_t from, size_t to, int cut)
{
    size_t n = to - from, i;
    if (n >= cap) {
        if (!cut) return 0;
        n = cap - 1;
    }
    for (i = 0; i < n; i++) dst[i] = body[from + i];
    dst[n] = '\0';
    return 1;
}

int fb_decode_receipt(const char *line, size_t len, fb_receipt *out)
{
    size_t start = 0, star, body_len, used, i, a, b, c;
    const char *body;
    uint16_t crc = 0;

    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) len--;
    while (start < len && line[start] != '$') start++;
    if (start >= len) return 0;
    body = line + start + 1;
    body_len = len - start - 1;
    if (body_len < 5 || body[body_len - 5] != '*') return 0;
    star = body_len - 5;
    for (i = 0; i < 4; i++) {
        int h = hexval(body[star + 1 + i]);
        if (h < 0) return 0;
        crc = (uint16_t)((crc << 4) | (uint16_t)h);
    }
    if (crc != fb_crc16((const uint8_t *)body, star)) return 0;
    if (!starts(body, star, "RCPT,", &used)) return 0;
    /* RCPT,<receipt>,<SENT|DEAD>,<alert-id>,<reason to the last '*'> */
    for (a = used; a < star && body[a] != ','; a++)
        if (!id_char(body[a])) return 0;
    if (a == used || a >= star) return 0;
    for (b = a + 1; b < star && body[b] != ','; b++) {}
    if (b >= star) return 0;
    for (c = b + 1; c < star && body[c] != ','; c++) {}
    if (c >= star || c == b + 1) return 0;
    if (b - a - 1 != 4) return 0;
    if (starts(body + a + 1, 4, "SENT", &i)) out->sent = 1;
    else if (starts(body + a + 1, 4, "DEAD", &i)) out->sent = 0;
    else return 0;
    if (!copy_field(out->receipt, sizeof out->receipt, body, used, a, 0)) return 0;
    if (!copy_field(out->alert_id, sizeof out->alert_id, body, b + 1, c, 0)) return 0;
    return copy_field(out->reason, sizeof out->reason, body, c + 1, star, 1);
}
