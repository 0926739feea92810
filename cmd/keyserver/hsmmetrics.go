package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyless-tls/keyless/hsm"
)

// registerSessionMetrics exports the use of the HSM's key-operation
// sessions: a pool that stays full means the HSM is saturated, or that
// PKCS #11 calls are stuck (which the keyserver also logs).
func registerSessionMetrics(reg prometheus.Registerer, m *hsm.Module) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "keyless_keyserver_hsm_sessions_in_use",
			Help: "PKCS #11 sessions held by key operations in progress, including calls whose callers gave up.",
		}, func() float64 { n, _ := m.Sessions(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "keyless_keyserver_hsm_sessions",
			Help: "PKCS #11 sessions available to key operations (-max-sessions minus the one crypto11 keeps).",
		}, func() float64 { _, n := m.Sessions(); return float64(n) }),
	)
}
