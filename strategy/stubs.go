package strategy

import "time"

type stub struct{ m *Machine }

func (p *stub) setup() Setup                              { return Setup{} }
func (p *stub) step(s Sample, now time.Duration) Decision { return wait("") }
func (p *stub) deadline(s Sample, now time.Duration) Decision {
	return Decision{Action: Abort, Reason: "budget"}
}
func (p *stub) applied(d Decision, err error) {}

type qemuPolicy = stub

func newAuto(m *Machine) policy     { return &stub{m} }
func newKubeVirt(m *Machine) policy { return &stub{m} }
func newNova(m *Machine) policy     { return &stub{m} }
func newProxmox(m *Machine) policy  { return &stub{m} }
