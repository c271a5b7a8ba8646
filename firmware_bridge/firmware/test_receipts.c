/* Host test of the device side's receipt frames against ../vectors.json's
 * "receipt_frames" (turned into receipt_vectors.h by tests/test_receipts_serial.py). */
#include <stdio.h>
#include <string.h>

#include "mailgw_proto.h"
#include "receipt_vectors.h"

static void print_hex(const char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)buf[i]);
    printf("\n");
}

int main(void)
{
    char out[FB_MAX_LINE + 1];
    fb_receipt r;
    for (size_t i = 0; i < sizeof alert_r_vectors / sizeof alert_r_vectors[0]; i++) {
        const struct alert_r_vector *v = &alert_r_vectors[i];
        print_hex(out, fb_encode_alert_r(out, sizeof out, v->seq, v->receipt, v->sensor,
                                         v->severity, v->message));
    }
    for (size_t i = 0; i < sizeof rack_vectors / sizeof rack_vectors[0]; i++)
        print_hex(out, fb_encode_rack(out, sizeof out, rack_vectors[i]));
    for (size_t i = 0; i < sizeof rcpt_vectors / sizeof rcpt_vectors[0]; i++) {
        memset(&r, 0, sizeof r);
        int ok = fb_decode_receipt(rcpt_vectors[i], strlen(rcpt_vectors[i]), &r);
        printf("rcpt %d %d %s %s|%s\n", ok, r.sent, r.receipt, r.alert_id, r.reason);
    }
    /* Refused, never truncated: an id too long or with a reserved character. */
    char big[FB_MAX_RECEIPT_ID + 2];
    memset(big, 'r', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    printf("long %lu\n", (unsigned long)fb_encode_rack(out, sizeof out, big));
    printf("reserved %lu\n", (unsigned long)fb_encode_alert_r(out, sizeof out, 1, "a,b", "s",
                                                              "info", "m"));
    return 0;
}
