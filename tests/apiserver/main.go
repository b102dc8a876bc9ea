// Command scopehold-apiserver runs a real kube-apiserver with an embedded etcd on
// loopback, for ScopeHold's integration tests and local demo.
//
// It writes into --dir:
//   - kubeconfig         admin credentials (system:masters), CA-verified TLS
//   - users.json         bearer tokens of the plain users (no groups) for RBAC tests
//   - ca.crt             the CA that signed the serving certificate
//
// and prints one line "ready <url>" on stdout once /readyz answers. It exits when
// its standard input closes (the parent test process died or finished), so a
// crashed test run never leaves an API server behind.
//
// Started again on the same --dir, it is the same cluster: it keeps etcd's data,
// the ports (ports.json), the CA, serving certificate and service-account signing
// key, and the admin and user tokens, so that a test can restart the API server
// under running clients and their credentials (and pods' tokens) still work.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

// Plain users for RBAC tests: they authenticate but belong to no group beyond
// system:authenticated, so they can do nothing until a test binds a role.
var plainUsers = []string{"alice", "bob", "mallory"}

func main() {
	dir := flag.String("dir", "", "state directory (created if missing)")
	port := flag.Int("port", 0, "secure port (0 picks a free one)")
	watchStdin := flag.Bool("exit-on-stdin-close", true, "exit when standard input closes")
	verbosity := flag.String("v", "0", "kube-apiserver log verbosity")
	flag.Parse()
	if *dir == "" {
		fail("--dir is required")
	}
	if err := run(*dir, *port, *watchStdin, *verbosity); err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "scopehold-apiserver:", msg)
	os.Exit(1)
}

func run(dir string, port int, watchStdin bool, verbosity string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if watchStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			os.Exit(0)
		}()
	}

	ports, err := loadOrPickPorts(filepath.Join(dir, "ports.json"), port)
	if err != nil {
		return fmt.Errorf("ports: %w", err)
	}
	etcdURL, err := startEtcd(filepath.Join(dir, "etcd"), ports)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	port = ports.APIServer
	pki, err := loadOrWritePKI(dir)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	tokenFile := filepath.Join(dir, "tokens.csv")
	adminToken, err := loadOrWriteTokens(dir, tokenFile)
	if err != nil {
		return fmt.Errorf("tokens: %w", err)
	}
	serverURL := fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := writeKubeconfig(filepath.Join(dir, "kubeconfig"), serverURL, pki.caPEM, adminToken); err != nil {
		return err
	}

	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", port),
		"--tls-cert-file=" + pki.certFile,
		"--tls-private-key-file=" + pki.keyFile,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-signing-key-file=" + pki.saKeyFile,
		"--service-account-key-file=" + pki.saKeyFile,
		"--authorization-mode=RBAC",
		"--token-auth-file=" + tokenFile,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--v=" + verbosity,
	}
	go waitReady(serverURL, pki.caPEM, adminToken)

	cmd := app.NewAPIServerCommand()
	cmd.SetArgs(args)
	return cmd.Execute()
}

// clusterPorts are the loopback ports of one cluster, kept in ports.json so that a
// restart on the same directory listens where clients already connect.
type clusterPorts struct {
	APIServer  int `json:"apiserver"`
	EtcdClient int `json:"etcdClient"`
	EtcdPeer   int `json:"etcdPeer"`
}

// loadOrPickPorts reads path, or picks free ports (the API server's is `port`
// when not 0) and writes them there.
func loadOrPickPorts(path string, port int) (clusterPorts, error) {
	var ports clusterPorts
	if data, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(data, &ports); err != nil {
			return ports, fmt.Errorf("%s: %w", path, err)
		}
		if port != 0 && port != ports.APIServer {
			return ports, fmt.Errorf("--port %d differs from port %d kept in %s", port, ports.APIServer, path)
		}
		return ports, nil
	} else if !os.IsNotExist(err) {
		return ports, err
	}
	var err error
	if ports.EtcdClient, err = freePort(); err != nil {
		return ports, err
	}
	if ports.EtcdPeer, err = freePort(); err != nil {
		return ports, err
	}
	ports.APIServer = port
	if ports.APIServer == 0 {
		if ports.APIServer, err = freePort(); err != nil {
			return ports, err
		}
	}
	data, _ := json.MarshalIndent(ports, "", "  ")
	return ports, os.WriteFile(path, data, 0o600)
}

// loadOrWriteTokens keeps tokens.csv and users.json of an earlier start, or
// makes new tokens for the admin and the plain users. Returns the admin token.
func loadOrWriteTokens(dir, tokenFile string) (string, error) {
	if data, err := os.ReadFile(tokenFile); err == nil {
		first, _, _ := strings.Cut(string(data), "\n")
		token, rest, found := strings.Cut(first, ",")
		if !found || !strings.HasPrefix(rest, "admin,") {
			return "", fmt.Errorf("%s: the first line is not the admin's", tokenFile)
		}
		if _, err := os.Stat(filepath.Join(dir, "users.json")); err != nil {
			return "", err
		}
		return token, nil
	} else if !os.IsNotExist(err) {
		return "", err
	}
	adminToken := randomToken()
	users := map[string]string{}
	lines := []string{fmt.Sprintf("%s,admin,admin-uid,\"system:masters\"", adminToken)}
	for _, u := range plainUsers {
		t := randomToken()
		users[u] = t
		lines = append(lines, fmt.Sprintf("%s,%s,%s-uid", t, u, u))
	}
	usersJSON, _ := json.MarshalIndent(users, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "users.json"), usersJSON, 0o600); err != nil {
		return "", err
	}
	// Last: its presence marks a complete set.
	if err := os.WriteFile(tokenFile, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		return "", err
	}
	return adminToken, nil
}

func startEtcd(dataDir string, ports clusterPorts) (string, error) {
	clientPort, peerPort := ports.EtcdClient, ports.EtcdPeer
	cfg := embed.NewConfig()
	cfg.Dir = dataDir
	cfg.Name = "scopehold"
	cfg.LogLevel = "error"
	cfg.UnsafeNoFsync = true
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return "", err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return "", fmt.Errorf("etcd not ready after 60s")
	}
	return client.String(), nil
}

func waitReady(serverURL string, caPEM []byte, token string) {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, serverURL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				fmt.Printf("ready %s\n", serverURL)
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	fail("kube-apiserver not ready after 3m")
}

type pkiFiles struct {
	caPEM     []byte
	certFile  string
	keyFile   string
	saKeyFile string
}

// loadOrWritePKI keeps the CA, serving certificate and signing key of an earlier
// start in dir, or makes them.
func loadOrWritePKI(dir string) (*pkiFiles, error) {
	p := &pkiFiles{
		certFile:  filepath.Join(dir, "apiserver.crt"),
		keyFile:   filepath.Join(dir, "apiserver.key"),
		saKeyFile: filepath.Join(dir, "sa.key"),
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if os.IsNotExist(err) {
		return writePKI(dir)
	} else if err != nil {
		return nil, err
	}
	for _, path := range []string{p.certFile, p.keyFile, p.saKeyFile} {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("ca.crt is kept but %w", err)
		}
	}
	p.caPEM = caPEM
	return p, nil
}

// writePKI makes a throwaway CA, a serving certificate for 127.0.0.1/localhost
// and the service-account signing key.
func writePKI(dir string) (*pkiFiles, error) {
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "scopehold-test-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	srvKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	p := &pkiFiles{
		caPEM:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		certFile:  filepath.Join(dir, "apiserver.crt"),
		keyFile:   filepath.Join(dir, "apiserver.key"),
		saKeyFile: filepath.Join(dir, "sa.key"),
	}
	writes := map[string][]byte{
		p.certFile:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		p.keyFile:   pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(srvKey)}),
		p.saKeyFile: pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
	}
	for path, data := range writes {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
	}
	// Last: its presence marks a complete set for the next start.
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), p.caPEM, 0o600); err != nil {
		return nil, err
	}
	return p, nil
}

func writeKubeconfig(path, server string, caPEM []byte, token string) error {
	cfg := map[string]any{
		"apiVersion":      "v1",
		"kind":            "Config",
		"current-context": "scopehold-local",
		"clusters": []map[string]any{{
			"name": "scopehold-local",
			"cluster": map[string]any{
				"server":                     server,
				"certificate-authority-data": base64.StdEncoding.EncodeToString(caPEM),
			},
		}},
		"users": []map[string]any{{
			"name": "admin",
			"user": map[string]any{"token": token},
		}},
		"contexts": []map[string]any{{
			"name":    "scopehold-local",
			"context": map[string]any{"cluster": "scopehold-local", "user": "admin", "namespace": "default"},
		}},
	}
	// JSON is valid YAML, and kubeconfig loaders accept it.
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o600)
}

func randomToken() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		fail(err.Error())
	}
	return hex.EncodeToString(b)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
