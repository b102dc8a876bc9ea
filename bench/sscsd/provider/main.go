// A Secrets Store CSI provider for the side-by-side benchmark: SSCSD v1.6.1's own
// mock provider server (provider/fake) answering every mount with one file,
// "api-key", holding the same 41-byte value ScopeHold's benchmark grants.
package main

import (
	"flag"
	"log"
	"os"
	"os/signal"
	"syscall"

	"sigs.k8s.io/secrets-store-csi-driver/provider/fake"
	"sigs.k8s.io/secrets-store-csi-driver/provider/v1alpha1"
)

func main() {
	socket := flag.String("socket", "", "provider socket: <provider-volume>/<name>.sock")
	value := flag.String("value", "sk-bench-0123456789abcdef0123456789abcdef", "the file's content")
	flag.Parse()
	if *socket == "" {
		log.Fatal("--socket is required")
	}
	_ = os.Remove(*socket)
	server, err := fake.NewMocKCSIProviderServer(*socket)
	if err != nil {
		log.Fatalf("provider server: %v", err)
	}
	server.SetObjects(map[string]string{"secret/api-key": "v1"})
	server.SetFiles([]*v1alpha1.File{{Path: "api-key", Mode: 0o644, Contents: []byte(*value)}})
	if err := server.Start(); err != nil {
		log.Fatalf("starting: %v", err)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	server.Stop()
}
