/*
 * c_scale: a small flux-edge plugin in freestanding C (see README.md).
 * Every 16-bit word of a register block becomes one measurement named <prefix><address>,
 * with value = raw * scale + offset (raw read as int16 when `signed = true`).
 */
#include "flux_plugin.h"

static double scale = 1.0, offset = 0.0;
static int is_signed = 0;
static char prefix[32] = "r";
static char unit[32] = "";

int flux_plugin_init(const char *cfg, uint32_t len) {
    flux_cfg_number(cfg, len, "scale", &scale);
    flux_cfg_number(cfg, len, "offset", &offset);
    flux_cfg_bool(cfg, len, "signed", &is_signed);
    if (flux_cfg_has(cfg, len, "prefix") && flux_cfg_string(cfg, len, "prefix", prefix, sizeof prefix) < 1) {
        flux_log_error("prefix must be a non-empty string of at most 31 bytes");
        return 1;
    }
    if (flux_cfg_has(cfg, len, "unit") && flux_cfg_string(cfg, len, "unit", unit, sizeof unit) < 0) {
        flux_log_error("unit must be a string of at most 31 bytes");
        return 1;
    }
    if (scale == 0 || scale != scale || scale - scale != 0) {
        flux_log_error("scale must be a finite, non-zero number");
        return 1;
    }
    char msg[128];
    flux_text t = flux_text_on(msg, sizeof msg);
    flux_text_str(&t, "c_scale: value = raw * ");
    flux_text_f64(&t, scale);
    flux_text_str(&t, " + ");
    flux_text_f64(&t, offset);
    flux_log_debug(msg);
    return 0;
}

void flux_plugin_process(const flux_msg *m, flux_out *out) {
    if (m->kind != FLUX_KIND_REGISTERS) {
        flux_out_error(out, "c_scale expects register words (kind 1)");
        return;
    }
    uint32_t n = flux_msg_register_count(m);
    if (n == 0) {
        flux_out_error(out, "empty register block");
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint16_t w = flux_msg_register(m, i);
        double raw = is_signed ? (double)(int16_t)w : (double)w;
        char name[64];
        flux_text t = flux_text_on(name, sizeof name);
        flux_text_str(&t, prefix);
        flux_text_i64(&t, (int64_t)m->address + i);
        flux_out_f64(out, name, raw * scale + offset, unit);
    }
}
