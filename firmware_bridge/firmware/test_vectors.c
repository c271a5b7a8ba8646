/* Host test of the device-side C code against ../vectors.json (turned into vectors.h by
 * tests/test_firmware.py). Prints one line per vector; the Python test compares them. */
#include <stdio.h>
#include <string.h>

#include "mailgw_proto.h"
#include "vectors.h"

static void print_hex(const char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)buf[i]);
    printf("\n");
}

int main(void)
{
    char out[FB_MAX_LINE + 1];
    fb_reply r;
    printf("crc %04X\n", fb_crc16((const uint8_t *)"123456789", 9));
    for (size_t i = 0; i < sizeof device_vectors / sizeof device_vectors[0]; i++) {
        const struct device_vector *v = &device_vectors[i];
        size_t n = 0;
        if (strcmp(v->type, "HELLO") == 0)
            n = fb_encode_hello(out, sizeof out, v->seq, v->a, v->b, v->c);
        else if (strcmp(v->type, "ALERT") == 0)
            n = fb_encode_alert(out, sizeof out, v->seq, v->a, v->b, v->c);
        else if (strcmp(v->type, "PING") == 0)
            n = fb_encode_ping(out, sizeof out, v->seq);
        print_hex(out, n);
    }
    for (size_t i = 0; i < sizeof reply_vectors / sizeof reply_vectors[0]; i++) {
        memset(&r, 0, sizeof r);
        int ok = fb_decode_reply(reply_vectors[i], strlen(reply_vectors[i]), &r);
        printf("reply %d %d %d %lu %s\n", ok, (int)r.kind, r.has_seq, (unsigned long)r.seq,
               r.reason);
    }
    /* A frame that does not fit is refused, never truncated. */
    printf("small %lu\n", (unsigned long)fb_encode_ping(out, 8, 123456));
    printf("reserved %lu\n", (unsigned long)fb_encode_alert(out, sizeof out, 1, "a,b", "info", "m"));
    return 0;
}
